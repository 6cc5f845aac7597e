"""Models from the user's own code: `--model package.module:factory`, or a registry entry `import = "..."`.

A researcher's classifier should not need an edit of this package to be evaluated. The factory is imported
as `python -m` would import it (the current directory first on sys.path) and called with the entry's
arguments; what it returns is checked on a probe batch before any attack runs, so a broken model costs one
`error:` line, not a traceback half-way through a run:

- a plain nn.Module is a CNN: model(x) -> logits (B, num_classes);
- a DEQClassifier subclass, or any module with a `deploy` attribute (it claims the DEQ protocol of
  bench/deq/protocol.py: inject, init_state, f, head), is solved by bench.deq and gets every
  estimator, readout and defense; a duck-typed one is wrapped in `ProtocolAdapter`;
- a torchdeq-built model is evaluated through models.torchdeq_adapter.TorchDEQAdapter, whose deployed
  prediction is checked equal to torchdeq's own forward here.

Code is imported only for a name given on the command line (`allow_import`, called by `bench evaluate`) or
for an entry of the user's registry file; a name read from a record or an expected-results file is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from bench.errors import BenchError

if TYPE_CHECKING:
    from torch import Tensor, nn

    from bench.entries import LoadedModel, ModelEntry

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
IMPORT_PATH = re.compile(rf"{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*")
PROTOCOL = ("inject", "init_state", "f", "head")
PROBE_BATCH = 2
PARITY_RTOL = 1e-4  # torchdeq's forward vs ours: max |diff| <= PARITY_RTOL * max(1, max |logit|)

_allowed: set[str] = set()


def is_import_path(name: str) -> bool:
    """`package.module:factory` (not a zoo name, which also has a colon)."""
    from bench.spec import ZOO_PREFIX

    return not name.startswith(ZOO_PREFIX) and IMPORT_PATH.fullmatch(name) is not None


def allow_import(name: str) -> None:
    """Mark `name` as given on the command line: the only way an import path may be imported."""
    if is_import_path(name):
        _allowed.add(name)


def _import_factory(path: str) -> Callable[..., Any]:
    module_name, _, attr = path.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:  # what `python -m` does; the console script does not
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise BenchError(
                f"cannot import {module_name!r} for model {path}: no module {exc.name!r} "
                f"(run from the directory that holds it, or add that directory to PYTHONPATH)"
            ) from None
        raise BenchError(f"importing {module_name!r} for model {path} failed: {_brief(exc)}") from None
    except Exception as exc:  # user code: any failure while importing it is the user's to fix
        raise BenchError(f"importing {module_name!r} for model {path} failed: {_brief(exc)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise BenchError(f"module {module_name!r} has no {attr!r} (model {path})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise BenchError(f"{path} is a {type(obj).__name__}, not a factory: name a function or class")
    return obj


def _brief(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _protocol_adapter_class() -> type:
    """ProtocolAdapter, defined on first use: torch is imported only when a model is built."""
    from bench.deq.protocol import DeployConfig, DEQClassifier

    class ProtocolAdapter(DEQClassifier):
        """A module that implements the DEQ protocol without subclassing DEQClassifier (no deq-bench import
        in the user's file); every call is the user's method, so results are the user's model's."""

        wraps_user_module = True  # checkpoints load into, and the record hashes, `inner`

        def __init__(self, inner: nn.Module, deploy: DeployConfig) -> None:
            super().__init__()
            self.inner = inner
            self.deploy = deploy

        def inject(self, x: Tensor) -> Any:
            return self.inner.inject(x)

        def init_state(self, u: Any) -> Tensor:
            return self.inner.init_state(u)

        def f(self, z: Tensor, u: Any) -> Tensor:
            return self.inner.f(z, u)

        def head(self, z: Tensor) -> Tensor:
            return self.inner.head(z)

        def begin_forward(self, batch_size: int) -> None:
            if hasattr(self.inner, "begin_forward"):
                self.inner.begin_forward(batch_size)

        def weights_cached(self) -> contextlib.AbstractContextManager[Any]:
            if hasattr(self.inner, "weights_cached"):
                return self.inner.weights_cached()
            return contextlib.nullcontext()

    return ProtocolAdapter


def _deploy_of(module: nn.Module, name: str) -> Any:
    from bench.deq.protocol import DeployConfig

    deploy = module.deploy
    if isinstance(deploy, DeployConfig):
        return deploy
    if isinstance(deploy, Mapping):
        try:
            return DeployConfig(**dict(deploy))
        except TypeError as exc:
            raise BenchError(f"model {name}: bad deploy settings {dict(deploy)}: {exc}") from None
    raise BenchError(
        f"model {name}: deploy must be a DeployConfig (bench.deq.protocol) or a dict of its fields"
    )


def as_evaluable(module: Any, name: str) -> nn.Module:
    """What the factory returned, as the module the harness evaluates (a CNN or a DEQClassifier)."""
    from torch import nn

    from bench.deq.protocol import is_deq

    if not isinstance(module, nn.Module):
        raise BenchError(f"factory {name} returned a {type(module).__name__}, not a torch.nn.Module")
    if is_deq(module):
        return module
    if hasattr(module, "deploy"):  # claims the DEQ protocol
        missing = [m for m in PROTOCOL if not callable(getattr(module, m, None))]
        if missing:
            raise BenchError(
                f"model {name} claims the DEQ protocol (it has deploy) but lacks {', '.join(missing)}"
            )
        return _protocol_adapter_class()(module, _deploy_of(module, name))
    if any(type(m).__module__.startswith("torchdeq") for m in module.modules()):
        raise BenchError(
            f"model {name} solves its fixed point with torchdeq: return "
            "models.torchdeq_adapter.TorchDEQAdapter(model, inject=..., f=..., head=...) from the factory"
        )
    return module


def weights_module(model: nn.Module) -> nn.Module:
    """The user's own module inside an adapter: checkpoints load into it and its weights are hashed."""
    return model.inner if getattr(type(model), "wraps_user_module", False) else model


def weights_sha256(module: nn.Module) -> str:
    """sha256 of the state dict (names, dtypes, shapes, bytes in name order): the weights evaluated."""
    import torch

    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}|{t.dtype}|{tuple(value.shape)}\n".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _probe(shape: tuple[int, ...]) -> Tensor:
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.rand(PROBE_BATCH, *shape, generator=gen)


def _shape(t: Any) -> str:
    return str(tuple(t.shape)) if hasattr(t, "shape") else type(t).__name__


def check_model(model: nn.Module, name: str, dataset: str, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """Run the model on a probe batch of the data set's shape; a broken contract is one BenchError.

    Checks the output shape, and for a DEQ that init_state gives (B, D), that f keeps that shape and that
    head gives (B, num_classes); a torchdeq adapter's prediction must equal torchdeq's forward. Returns
    what the record keeps (the kind of model and the forward check).
    """
    import torch

    from bench.data import dataset_info
    from bench.deq.protocol import is_deq

    classes = dataset_info(dataset).num_classes
    device = next((p.device for p in model.parameters()), torch.device("cpu"))  # a factory may move it
    x = _probe(input_shape).to(device)
    where = f"model {name} on a {dataset} batch of shape {tuple(x.shape)}"
    info: dict[str, Any] = {"kind": "deq" if is_deq(model) else "cnn"}
    try:
        with torch.no_grad():
            if is_deq(model):
                model.begin_forward(x.shape[0])
                u = model.inject(x)
                z0 = model.init_state(u)
                if not isinstance(z0, torch.Tensor) or z0.dim() != 2 or z0.shape[0] != x.shape[0]:
                    raise BenchError(f"{where}: init_state must return (batch, D), got {_shape(z0)}")
                fz = model.f(z0, u)
                if not isinstance(fz, torch.Tensor) or fz.shape != z0.shape:
                    raise BenchError(
                        f"{where}: f changes the state shape from {_shape(z0)} to {_shape(fz)}; "
                        "f must map (B, D) to (B, D)"
                    )
                head = model.head(fz)
                if not isinstance(head, torch.Tensor) or tuple(head.shape) != (x.shape[0], classes):
                    raise BenchError(
                        f"{where}: head returns {_shape(head)}, expected ({x.shape[0]}, {classes}) "
                        f"({classes} classes)"
                    )
            logits = model(x)
            if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (x.shape[0], classes):
                raise BenchError(
                    f"{where}: the output has shape {_shape(logits)}, expected ({x.shape[0]}, {classes})"
                )
            alone = model(x[:1])
        if not torch.allclose(alone, logits[:1], rtol=1e-4, atol=1e-5):
            raise BenchError(
                f"{where}: an example's logits depend on the rest of its batch; in eval mode every part "
                "must be per example (BatchNorm with running statistics, no batch-wide reductions)"
            )
        if hasattr(model, "check_forward"):  # a torchdeq adapter: our solve must predict what torchdeq does
            info["kind"] = "torchdeq"
            info["forward_check"] = parity = model.check_forward(x)
            if parity["max_abs_diff"] > PARITY_RTOL * max(1.0, parity["scale"]) or parity["agreement"] < 1:
                raise BenchError(
                    f"{where}: deq-bench's solve at the deployed settings ({model.deploy.solver}, "
                    f"max_iter {model.deploy.max_iter}) differs from torchdeq's own forward by "
                    f"{parity['max_abs_diff']:.3g}; build the torchdeq core with f_solver fixed_point_iter "
                    "or anderson (reproduced here) or a tighter f_tol"
                )
    except BenchError:
        raise
    except Exception as exc:  # user code: shape errors, wrong dtypes, anything its forward raises
        raise BenchError(f"{where} fails: {_brief(exc)}") from None
    return info


def build(path: str, args: Mapping[str, Any]) -> nn.Module:
    """Import and call the factory; the evaluable module it gives (unchecked: see check_model)."""
    factory = _import_factory(path)
    try:
        module = factory(**dict(args))
    except Exception as exc:
        raise BenchError(f"factory {path} failed: {_brief(exc)}") from None
    return as_evaluable(module, path)


def command_line_entry(path: str, dataset: str | None) -> ModelEntry:
    """The registry entry of a model named by import path on the command line.

    The data set is `--dataset`, else the factory's `dataset` attribute; eps is the data set's default
    (or `--eps`), as for every registered model.
    """
    from bench.data import dataset_info
    from bench.entries import ModelEntry

    if path not in _allowed:
        raise BenchError(
            f"model {path!r} is an import path; deq-bench imports code only when it is named on the command "
            "line (bench evaluate --model) or in your registry file, never from a record"
        )
    if dataset is None:
        dataset = getattr(_import_factory(path), "dataset", None)
        if not isinstance(dataset, str):
            raise BenchError(
                f"model {path}: say which data set it is for: --dataset NAME, or set "
                f"{path.partition(':')[2]}.dataset = 'fashion-mnist' in its module"
            )
    info = dataset_info(dataset)
    return ModelEntry(
        name=path,
        family="user",
        architecture=path,
        dataset=dataset.replace("-builtin", ""),
        input_shape=info.input_shape,
        threat_model="Linf",
        eps=repr(info.eps),
        parameters=0,
        description=f"user model {path}",
        import_path=path,
    )


def load_user_model(entry: ModelEntry, checkpoint: str | os.PathLike[str] | None) -> LoadedModel:
    """Build, load weights (the entry's registered file, `checkpoint`, or the factory's own), check."""
    from pathlib import Path

    from bench.checkpoints import load_into, load_state_dict, sha256_file
    from bench.deq.protocol import DeployConfig, is_deq
    from bench.entries import LoadedModel

    model = build(entry.import_path, entry.config)
    if is_deq(model) and entry.deploy:
        model.deploy = DeployConfig(**{**model.deploy.to_dict(), **entry.deploy})
    path: Path | None = None
    expected = None
    if checkpoint is not None:
        path = Path(checkpoint)
        if path.is_dir():
            raise BenchError(f"checkpoint {path} is a directory, not a weights file")
        if not path.is_file():
            raise BenchError(f"checkpoint {path} does not exist")
    elif entry.checkpoint.registered:
        path, expected = entry.checkpoint.path(), entry.checkpoint.sha256 or None
        if not path.is_file():
            raise BenchError(f"checkpoint for {entry.name!r} is missing: place it at {path}")
    metadata: dict[str, str] = {}
    if path is not None:
        state_dict, metadata = load_state_dict(path, expected)
        load_into(weights_module(model), state_dict)
    model = model.eval()
    info = check_model(model, entry.import_path, entry.dataset, entry.input_shape)
    source = {
        "import": entry.import_path,
        "factory_args": dict(entry.config),
        "weights_sha256": weights_sha256(weights_module(model)),
        **info,
    }
    built = replace(
        entry,
        family="deq" if is_deq(model) else "cnn",
        parameters=sum(p.numel() for p in model.parameters()),
        recipe=entry.recipe or _recipe_of(model),
    )
    digest = sha256_file(path) if path is not None else None
    return LoadedModel(built, model, None if path is None else str(path), digest, metadata, user_model=source)


def _recipe_of(model: nn.Module) -> dict[str, Any]:
    grad = getattr(model, "training_grad", None)
    return {"grad": grad} if isinstance(grad, str) else {}
