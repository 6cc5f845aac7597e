"""Named models, kept as data in bench/registry/models.toml, and the one way every command loads them.

An entry says what to build (architecture + config), what it expects (data set, input shape, threat model,
eps) and which weights to load (file + sha256 + provenance). `load_model` is the only path from a name to
an nn.Module with weights, so every command verifies hashes and keys the same way.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import fields
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.entries import CheckpointRef, LoadedModel, ModelEntry
from bench.errors import BenchError, did_you_mean
from bench.paths import PACKAGE_DIR
from bench.spec import ZOO_PREFIX

if TYPE_CHECKING:  # torch is imported only by the functions that build models: listing stays fast
    from torch import nn

REGISTRY_FILE = PACKAGE_DIR / "registry" / "models.toml"


_REQUIRED = ("family", "architecture", "dataset", "input_shape", "threat_model", "eps", "parameters")


def _import_table(name: str, table: dict[str, Any]) -> dict[str, Any]:
    """An `import = "package.module:factory"` entry: [config] is the factory's keyword arguments; what is
    known only once the model is built (family, parameters) gets a placeholder, the rest the data set's."""
    from bench.data import dataset_info
    from bench.user_models import is_import_path

    table = dict(table)
    path = table.pop("import")
    if not isinstance(path, str) or not is_import_path(path):
        raise BenchError(f"registry entry {name!r}: import must read 'package.module:factory', got {path!r}")
    if "architecture" in table:
        raise BenchError(f"registry entry {name!r} has both import and architecture: keep one")
    if "dataset" not in table:
        raise BenchError(f"registry entry {name!r} lacks dataset (an import entry needs it)")
    info = dataset_info(str(table["dataset"]))
    defaults = {"family": "user", "input_shape": list(info.input_shape), "threat_model": "Linf"}
    return {
        **defaults,
        "eps": repr(info.eps),
        "parameters": 0,
        **table,
        "architecture": path,
        "import_path": path,
    }


def _entry_from_table(name: str, table: dict[str, Any]) -> ModelEntry:
    if "import" in table:
        table = _import_table(name, table)
    missing = [k for k in _REQUIRED if k not in table]
    if missing:
        raise BenchError(f"registry entry {name!r} lacks {', '.join(missing)} ({REGISTRY_FILE})")
    known = {f.name for f in fields(ModelEntry)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise BenchError(f"registry entry {name!r} has unknown fields {', '.join(unknown)}")
    table = dict(table)
    table["input_shape"] = tuple(int(v) for v in table["input_shape"])
    table["checkpoint"] = CheckpointRef(**table.get("checkpoint", {}))
    return ModelEntry(name=name, **table)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise BenchError(f"cannot read registry file {path}: {exc}") from None


@cache
def registry() -> dict[str, ModelEntry]:
    """The package's registry, plus the entries of `DEQ_BENCH_EXTRA_REGISTRY` (a TOML file) if set.

    The extra file lets users and tests register their own models without editing the package.
    """
    raw = _read_toml(REGISTRY_FILE)
    extra = os.environ.get("DEQ_BENCH_EXTRA_REGISTRY")
    if extra:
        for name, table in _read_toml(Path(extra)).items():
            if name in raw:
                raise BenchError(f"{extra} redefines the built-in model {name!r}")
            raw[name] = table
    return {name: _entry_from_table(name, table) for name, table in raw.items()}


def get_entry(name: str) -> ModelEntry:
    if name.startswith(ZOO_PREFIX):
        return zoo_model_entry(name)
    entries = registry()
    if name not in entries:
        raise BenchError(f"unknown model {name!r}{did_you_mean(name, entries)}")
    return entries[name]


def zoo_model_entry(name: str) -> ModelEntry:
    """A registry entry for a RobustBench zoo model (`robustbench:<Name>`), built from its zoo record."""
    from bench.zoo import zoo_entry_info

    info = zoo_entry_info(name)
    if info.threat_model != "Linf" or info.dataset != "cifar10":
        raise BenchError(f"{info.name}: deq-bench evaluates L-inf CIFAR-10 zoo models only")
    return ModelEntry(
        name=info.name,
        family="zoo",
        architecture=info.architecture,
        dataset="cifar10",
        input_shape=(3, 32, 32),
        threat_model="Linf",
        eps="8/255",
        parameters=0,
        description=f"RobustBench zoo: {info.constructor or info.architecture}",
        checkpoint=CheckpointRef(
            file=", ".join(info.checkpoint_files), provenance=f"robustbench ({info.source})"
        ),
    )


def _zoo_model(name: str, checkpoint: str | Path | None) -> tuple[nn.Module, Path | None]:
    """A zoo model through robustbench's loader; `checkpoint` is placed where that loader looks for it."""
    import tempfile

    from bench.zoo import default_zoo_dir, load_zoo_model, parse_zoo_name

    if checkpoint is None:
        ref = parse_zoo_name(name)
        model = load_zoo_model(name)
        path = default_zoo_dir() / ref.dataset / ref.folder / f"{ref.model_name}.pt"
        return model, path if path.is_file() else None
    src = Path(checkpoint).resolve()
    if src.is_dir():
        raise BenchError(f"checkpoint {checkpoint} is a directory, not a weights file")
    if not src.is_file():
        raise BenchError(f"checkpoint {checkpoint} does not exist")
    ref = parse_zoo_name(name)
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / ref.dataset / ref.folder / f"{ref.model_name}.pt"
        target.parent.mkdir(parents=True)
        target.symlink_to(src)
        return load_zoo_model(name, tmp, allow_download=False), src


def checkpoint_status(entry: ModelEntry) -> str:
    """'present', 'missing', 'hash mismatch' or 'not registered' for `bench models`."""
    from bench.checkpoints import sha256_file

    ref = entry.checkpoint
    if not ref.registered:
        return "not registered"
    path = ref.path()
    if not path.is_file():
        return "missing"
    if ref.sha256 and sha256_file(path) != ref.sha256:
        return "hash mismatch"
    return "present"


def deploy_of(entry: ModelEntry) -> dict[str, Any] | None:
    """The deployed prediction a DEQ entry's checkpoint was trained for (DeployConfig fields); None for a
    plain network. Read from the registry without building the model."""
    if entry.family != "deq":
        return None
    from bench.deq.protocol import DeployConfig

    return {**DeployConfig().to_dict(), **entry.deploy}


def build_architecture(entry: ModelEntry) -> nn.Module:
    """The entry's architecture with fresh (random) weights (an import entry: what its factory returns)."""
    from bench.deq.protocol import DeployConfig, is_deq

    if entry.import_path:
        from bench.user_models import build

        model = build(entry.import_path, entry.config)
        if is_deq(model) and entry.deploy:
            model.deploy = DeployConfig(**{**model.deploy.to_dict(), **entry.deploy})
        return model
    from models.factory import build_architecture as build

    model = build(entry.architecture, dict(entry.config))
    if is_deq(model) and entry.deploy:
        model.deploy = DeployConfig(**{**model.deploy.to_dict(), **entry.deploy})
    return model


def load_model(
    name: str,
    checkpoint: str | Path | None = None,
    *,
    random_weights: bool = False,
    dataset: str | None = None,
) -> LoadedModel:
    """Build the named model and load its weights: the registered file, or `checkpoint` if given.

    The registered file is verified against its sha256 before loading. A user-given file has no expected
    hash; its sha256 is computed and recorded. `random_weights=True` (benchmarks, tests) loads nothing.
    `name` may be an import path `package.module:factory` given on the command line (bench/user_models.py);
    `dataset` is then the data set it is evaluated on, when the factory does not say.
    """
    from bench.checkpoints import load_into, load_state_dict, sha256_file
    from bench.user_models import command_line_entry, is_import_path, load_user_model

    if is_import_path(name) and name not in registry():
        return load_user_model(command_line_entry(name, dataset), checkpoint)
    entry = get_entry(name)
    if entry.import_path:
        return load_user_model(entry, checkpoint)
    if entry.family == "zoo":
        model, path = _zoo_model(name, checkpoint)
        digest = sha256_file(path) if path is not None else None
        return LoadedModel(entry, model.eval(), None if path is None else str(path), digest, {})
    model = build_architecture(entry)
    if random_weights:
        return LoadedModel(entry, model.eval(), None, None, {})
    if checkpoint is not None:
        path, expected = Path(checkpoint), None
        if path.is_dir():
            raise BenchError(f"checkpoint {path} is a directory, not a weights file")
        if not path.is_file():
            raise BenchError(f"checkpoint {path} does not exist")
    else:
        ref = entry.checkpoint
        if not ref.registered:
            raise BenchError(f"model {name!r} has no registered checkpoint: {ref.provenance}")
        path, expected = ref.path(), ref.sha256 or None
        if not path.is_file():
            hint = f" or download it from {ref.url}" if ref.url else ""
            raise BenchError(f"checkpoint for {name!r} is missing: place it at {path}{hint}")
    state_dict, metadata = load_state_dict(path, expected)
    convert = None
    if entry.architecture == "mdeq" and any(k.endswith("_g") or k.endswith("_v") for k in state_dict):
        from models.paper_keys import convert_paper_state_dict

        convert = convert_paper_state_dict
    load_into(model, state_dict, convert=convert)
    return LoadedModel(entry, model.eval(), str(path), sha256_file(path), metadata)
