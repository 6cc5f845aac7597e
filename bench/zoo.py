"""RobustBench zoo baselines by name: `robustbench:<Name>` or `robustbench:<dataset>/<threat>/<Name>`.

robustbench's own loader downloads a missing checkpoint straight to its final path with no timeout and no
check, so an offline machine hangs and a failed download leaves a web page that later loads fail on. Here
the checkpoint file is checked first; a download is tried only for a missing file, into a temp file that is
checked and then renamed; any network failure becomes one line saying which file to place where. Loading
then goes through robustbench's loader (its key fix-ups for each model) with `torch.load` forced into
weights-only mode, whatever the environment says.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from bench.checkpoints import ensure_plausible_checkpoint, load_failure_error
from bench.compat import import_robustbench
from bench.errors import BenchError, did_you_mean
from bench.paths import checkpoints_dir
from bench.spec import ZOO_PREFIX as PREFIX

DEFAULT_DATASET = "cifar10"
DEFAULT_THREAT_MODEL = "Linf"
GDRIVE_HOST = "drive.google.com"
PROBE_TIMEOUT_S = 5.0  # connect + DNS budget before declaring the machine offline
SOCKET_TIMEOUT_S = 30.0  # per socket operation for urllib-based fetches (torchvision); requests ignores it


@dataclass(frozen=True)
class ZooRef:
    """A parsed zoo name."""

    dataset: str
    threat_model: str
    model_name: str

    @property
    def canonical(self) -> str:
        return f"{PREFIX}{self.dataset}/{self.threat_model}/{self.model_name}"

    @property
    def folder(self) -> str:
        """robustbench keeps the 3D corruption models with the 2D ones."""
        return self.threat_model.replace("_3d", "")


@dataclass(frozen=True)
class ZooEntryInfo:
    """What `bench models` shows for a zoo entry (robustbench's zoo dict has no paper metadata)."""

    name: str
    model_name: str
    dataset: str
    threat_model: str
    architecture: str
    constructor: str | None  # the zoo's constructor call, e.g. "WideResNet(depth=28, widen_factor=10)"
    first_author: str | None  # parsed from the zoo's <Author><Year><Tag> naming convention
    year: int | None
    source: str  # "gdrive" (a file under model_dir), "timm" (Hugging Face hub) or "torchvision"
    checkpoint_files: tuple[str, ...]  # relative to model_dir
    download_ids: tuple[str, ...]


def default_zoo_dir() -> Path:
    return checkpoints_dir() / "robustbench"


def is_zoo_name(name: str) -> bool:
    return name.startswith(PREFIX)


def _robustbench() -> tuple[ModuleType, Any, Any, Any]:
    rb = import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    return rb, model_dicts, BenchmarkDataset, ThreatModel


def parse_zoo_name(name: str) -> ZooRef:
    """`robustbench:Name` (cifar10, Linf) or `robustbench:<dataset>/<threat>/<Name>`; prefix optional."""
    _, _, datasets, threats = _robustbench()
    parts = name.removeprefix(PREFIX).split("/")
    if len(parts) == 1:
        dataset, threat, model_name = DEFAULT_DATASET, DEFAULT_THREAT_MODEL, parts[0]
    elif len(parts) == 3:
        dataset, threat, model_name = parts
    else:
        raise BenchError(f"bad zoo name {name!r}: use {PREFIX}<Name> or {PREFIX}<dataset>/<threat>/<Name>")
    if not model_name:
        raise BenchError(f"bad zoo name {name!r}: the model name is empty")
    valid_datasets = {d.value.lower(): d.value for d in datasets}
    if dataset.lower() not in valid_datasets:
        raise BenchError(
            f"unknown RobustBench dataset {dataset!r}" + did_you_mean(dataset, valid_datasets.values())
        )
    valid_threats = {t.value.lower(): t.value for t in threats}
    if threat.lower() not in valid_threats:
        raise BenchError(
            f"unknown RobustBench threat model {threat!r}" + did_you_mean(threat, valid_threats.values())
        )
    return ZooRef(valid_datasets[dataset.lower()], valid_threats[threat.lower()], model_name)


def _entry(ref: ZooRef) -> dict[str, Any]:
    """The zoo dict entry; an unknown name gets a suggestion, or the dataset/threat where it does exist."""
    _, model_dicts, datasets, threats = _robustbench()
    models = model_dicts[datasets(ref.dataset)].get(threats(ref.folder), {})
    if ref.model_name in models:
        return models[ref.model_name]
    elsewhere = [
        f"{PREFIX}{ds.value}/{tm.value}/{ref.model_name}"
        for ds, by_threat in model_dicts.items()
        for tm, entries in by_threat.items()
        if ref.model_name in entries
    ]
    hint = f" (it exists as {' and '.join(elsewhere)})" if elsewhere else did_you_mean(ref.model_name, models)
    raise BenchError(
        f"no RobustBench zoo model {ref.model_name!r} for {ref.dataset}/{ref.threat_model}{hint}"
    )


def _source(ref: ZooRef, entry: dict[str, Any]) -> str:
    """Mirror robustbench's own dispatch: timm-registered names win, then ImageNet 'Standard', then Drive."""
    import timm

    timm_name = f"{ref.model_name.lower().replace('-', '_')}_{ref.dataset.lower()}_{ref.folder.lower()}"
    if timm.is_model(timm_name):
        return "timm"
    if ref.dataset == "imagenet" and "Standard" in ref.model_name:
        return "torchvision"
    if not entry.get("gdrive_id"):
        raise BenchError(f"{ref.canonical} has no downloadable checkpoint in robustbench's zoo")
    return "gdrive"


def _checkpoints(ref: ZooRef, entry: dict[str, Any], model_dir: Path) -> list[tuple[Path, str]]:
    """(file, Drive id) pairs exactly where robustbench's loader looks; ensembles have one file per member."""
    base = model_dir / ref.dataset / ref.folder / f"{ref.model_name}.pt"
    ids = entry["gdrive_id"]
    if isinstance(ids, list):
        return [(base.with_name(f"{base.name}_m{i}.pt"), gid) for i, gid in enumerate(ids)]
    return [(base, ids)]


def _drive_url(gdrive_id: str) -> str:
    return f"https://drive.google.com/uc?id={gdrive_id}"


def _placement_error(ref: ZooRef, missing: list[tuple[Path, str]], reason: str) -> BenchError:
    wanted = " and ".join(f"{_drive_url(gid)} at {path}" for path, gid in missing)
    files = "checkpoint file is" if len(missing) == 1 else "checkpoint files are"
    return BenchError(
        f"{ref.canonical}: the {files} missing and could not be downloaded ({reason}); "
        f"download on a machine with internet access and place {wanted}"
    )


def _reachable(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """TCP probe run in a daemon thread, so a DNS lookup that never answers cannot hang the caller."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except Exception:  # no route, refused, DNS failure, sandbox: all mean "offline"
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(result and result[0])


@contextlib.contextmanager
def _socket_timeout(seconds: float = SOCKET_TIMEOUT_S) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """robustbench calls `torch.load` without `weights_only`; make sure that means True, whatever the env."""
    saved = {
        k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    }
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _download(ref: ZooRef, dest: Path, gdrive_id: str, missing: list[tuple[Path, str]]) -> None:
    """Fetch one Drive file into a temp file, reject web pages, then rename into place."""
    if not _reachable(GDRIVE_HOST):
        raise _placement_error(ref, missing, f"{GDRIVE_HOST} is unreachable")
    import gdown

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        with _socket_timeout():
            got = gdown.download(id=gdrive_id, output=str(tmp), quiet=False)
        if got is None or not tmp.is_file():
            raise BenchError("the download produced no file")
        ensure_plausible_checkpoint(tmp)
        os.replace(tmp, dest)
    except Exception as exc:  # gdown/requests raise many types; each means "place the file by hand"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise _placement_error(ref, missing, reason) from None
    finally:
        tmp.unlink(missing_ok=True)


def _one_line(text: str, limit: int = 400) -> str:
    joined = "; ".join(line.strip() for line in text.splitlines() if line.strip())
    return joined if len(joined) <= limit else joined[: limit - 3] + "..."


def _load_error(ref: ZooRef, files: list[Path], exc: Exception) -> BenchError:
    where = str(files[0]) if len(files) == 1 else f"{files[0].parent}/{ref.model_name}.pt_m*.pt"
    text = str(exc)
    if "Error(s) in loading state_dict" in text:
        return BenchError(
            f"checkpoint {where} does not fit the zoo architecture of {ref.canonical}: {_one_line(text)}"
        )
    if isinstance(exc, RuntimeError | EOFError | OSError) or "pickl" in type(exc).__name__.lower():
        return load_failure_error(where, exc)
    return BenchError(
        f"robustbench could not load {ref.canonical} from {where}: {type(exc).__name__}: {_one_line(text)}"
    )


def load_zoo_model(
    name: str, model_dir: str | os.PathLike[str] | None = None, *, allow_download: bool = True
) -> nn.Module:
    """Build a zoo model with its weights, in eval mode; never hangs offline.

    Drive-hosted checkpoints live at `model_dir/<dataset>/<threat>/<Name>.pt` (robustbench's layout;
    ensembles: `<Name>.pt_m<i>.pt`). The few timm/torchvision-hosted entries come from those libraries'
    caches instead. `allow_download=False` guarantees no network access is attempted.
    """
    ref = parse_zoo_name(name)
    entry = _entry(ref)
    source = _source(ref, entry)
    model_dir = Path(model_dir) if model_dir is not None else default_zoo_dir()
    rb_utils = import_robustbench().utils
    if source != "gdrive":
        hub = "the Hugging Face hub" if source == "timm" else "download.pytorch.org"
        if not allow_download:
            raise BenchError(f"{ref.canonical} is fetched by {source} from {hub}, and downloads are disabled")
        try:
            with _socket_timeout():
                model = rb_utils.load_model(ref.model_name, str(model_dir), ref.dataset, ref.threat_model)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {_one_line(str(exc), 200)}"
            raise BenchError(
                f"{ref.canonical} is fetched by {source} from {hub} (not from a file under {model_dir}) "
                f"and needs network on first use; loading failed: {reason}"
            ) from None
        return model.eval()
    files = _checkpoints(ref, entry, model_dir)
    missing = [(path, gid) for path, gid in files if not path.is_file()]
    if missing and not allow_download:
        raise _placement_error(ref, missing, "downloads are disabled")
    for path, gid in missing:
        _download(ref, path, gid, missing)
    for path, _ in files:
        ensure_plausible_checkpoint(path)
    try:
        with _weights_only_loads(), _socket_timeout():
            model = rb_utils.load_model(ref.model_name, str(model_dir), ref.dataset, ref.threat_model)
    except Exception as exc:  # robustbench gives no error contract; every failure is about this file
        raise _load_error(ref, [p for p, _ in files], exc) from None
    return model.eval()


def _call_text(source: str) -> str | None:
    """The constructor call inside a zoo lambda's source, with whitespace collapsed."""
    found = re.search(r"lambda\s*:\s*\(?\s*", source)
    if not found:
        return None
    start, depth = found.end(), 0
    for i in range(start, len(source)):
        if source[i] == "(":
            depth += 1
        elif source[i] == ")":
            depth -= 1
            if depth == 0:
                return " ".join(source[start : i + 1].split()).replace("( ", "(")
    return None


def _describe_constructor(ctor: Any) -> tuple[str, str | None]:
    """(architecture, constructor call) for a zoo entry's 'model' value: a class, function or lambda."""
    if inspect.isclass(ctor):
        bases = [b.__name__ for b in ctor.__bases__ if b is not nn.Module]
        return (f"{ctor.__name__} ({', '.join(bases)})" if bases else ctor.__name__), None
    name = getattr(ctor, "__name__", type(ctor).__name__)
    if name != "<lambda>":
        return name, None  # a named factory (ResNet18, rebuffi_sodef): its name is the best summary
    call = None
    with contextlib.suppress(OSError, TypeError):
        call = _call_text(inspect.getsource(ctor))
    names = ctor.__code__.co_names
    classes = [n for n in names if inspect.isclass(ctor.__globals__.get(n))]
    if classes:
        return classes[0], call
    return (call.split("(")[0] if call else name), call


def zoo_entry_info(name: str) -> ZooEntryInfo:
    """Architecture and provenance of a zoo entry, without building it or touching the network."""
    ref = parse_zoo_name(name)
    entry = _entry(ref)
    source = _source(ref, entry)
    architecture, call = _describe_constructor(entry["model"])
    if source == "timm":
        architecture = f"timm {ref.model_name.lower().replace('-', '_')}_{ref.dataset}_{ref.folder.lower()}"
    author = re.match(r"^(\D+?)(\d{4})", ref.model_name)
    files: tuple[str, ...] = ()
    ids: tuple[str, ...] = ()
    if source == "gdrive":
        pairs = _checkpoints(ref, entry, Path())
        files, ids = tuple(str(p) for p, _ in pairs), tuple(g for _, g in pairs)
    return ZooEntryInfo(
        name=ref.canonical,
        model_name=ref.model_name,
        dataset=ref.dataset,
        threat_model=ref.threat_model,
        architecture=architecture,
        constructor=call,
        first_author=author.group(1) if author else None,
        year=int(author.group(2)) if author else None,
        source=source,
        checkpoint_files=files,
        download_ids=ids,
    )


def list_zoo_models(dataset: str = DEFAULT_DATASET, threat_model: str = DEFAULT_THREAT_MODEL) -> list[str]:
    """Canonical names of every zoo entry for one dataset and threat model, in robustbench's order."""
    ref = parse_zoo_name(f"{dataset}/{threat_model}/_")
    _, model_dicts, datasets, threats = _robustbench()
    models = model_dicts[datasets(ref.dataset)].get(threats(ref.folder), {})
    return [f"{PREFIX}{ref.dataset}/{ref.threat_model}/{n}" for n in models]
