"""Safe checkpoint I/O: hash first, never unpickle code, match keys strictly, write atomically.

Third-party checkpoints are untrusted files. A `.pt` pickle can run arbitrary code when loaded, a failed
download can leave an HTML page where weights should be, and a loose `load_state_dict(strict=False)` can
silently leave layers at their random initialisation. Every path here fails loudly, with one readable line.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from bench.errors import BenchError
from bench.io import atomic_write_bytes

log = logging.getLogger(__name__)

StateDict = dict[str, Tensor]
TORCH_SUFFIXES = (".pt", ".pth", ".pth.tar")
SAFETENSORS_SUFFIX = ".safetensors"
NESTED_KEYS = ("state_dict", "model_state_dict", "model")  # where training scripts nest the weights
STRIP_PREFIXES = ("module.", "model.")  # DataParallel / wrapper prefixes
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_LIST_LIMIT = 5


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB checkpoints never sit in memory twice."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    except FileNotFoundError:
        raise BenchError(f"checkpoint file not found: {path}") from None
    except IsADirectoryError:
        raise BenchError(f"checkpoint path is a directory, not a file: {path}") from None
    return digest.hexdigest()


def _normalise_sha256(expected: str) -> str:
    value = expected.strip().lower().removeprefix("sha256:")
    if not _SHA256_RE.match(value):
        raise BenchError(f"expected sha256 {expected!r} is not 64 hex digits")
    return value


def verify_sha256(path: str | os.PathLike[str], expected_sha256: str) -> None:
    """Raise if the file's hash differs from the registered one (a different or corrupted file)."""
    expected = _normalise_sha256(expected_sha256)
    actual = sha256_file(path)
    if actual != expected:
        raise BenchError(
            f"checkpoint {path} has sha256 {actual}, expected {expected}: "
            "the file is corrupted or not the registered one (delete it and fetch it again)"
        )


def ensure_plausible_checkpoint(path: str | os.PathLike[str]) -> None:
    """Reject files that cannot be weights before any parser touches them: empty files and web pages.

    Web pages are the classic failed download (a Google Drive warning page saved as `.pt`).
    """
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"checkpoint file not found: {path}")
    with path.open("rb") as fh:
        head = fh.read(512)
    if not head:
        raise BenchError(f"checkpoint {path} is empty (0 bytes): an interrupted download? delete it")
    if head.lstrip().startswith(b"<"):  # no weights format starts with '<'; HTML and XML pages do
        raise BenchError(f"checkpoint {path} is a web page, not weights (a failed download?): delete it")


def load_failure_error(path: str | os.PathLike[str], exc: BaseException) -> BenchError:
    """Turn whatever `torch.load(weights_only=True)` raised into one readable line."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "weights only load failed" in text.lower():
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            return BenchError(
                f"refused to load {path}: it pickles the Python object {found.group(1)}, and unpickling it "
                "could run arbitrary code; convert the file once, from a trusted source, to .safetensors"
            )
        operand = re.search(r"Unsupported operand[^\n]*", text)
        detail = f" ({operand.group(0).strip()})" if operand else ""
        return BenchError(
            f"refused to load {path}: it is not a plain tensor checkpoint readable in weights-only mode"
            f"{detail}; loading it any other way could run arbitrary code"
        )
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    first = first.split(". ")[0][:200]  # torch appends paragraphs of advice after the first sentence
    return BenchError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupted?): {first}")


def _read_safetensors(path: Path) -> tuple[StateDict, dict[str, str]]:
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # the parser's many error types all mean the same to the user
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BenchError(f"{path} is not a valid safetensors file (corrupted?): {reason}") from None
    return tensors, metadata


def _read_torch(path: Path) -> object:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # refusal, truncation, garbage: each becomes one line
        raise load_failure_error(path, exc) from None


def _select_weights(obj: object, path: Path) -> StateDict:
    """Find the tensor dict inside a training script's checkpoint dict and drop everything else."""
    if not isinstance(obj, Mapping):
        raise BenchError(f"{path} holds a {type(obj).__name__}, not a dict of weights")
    for key in NESTED_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, Tensor) for v in inner.values()):
            log.info("%s: using the weights nested under %r", path, key)
            obj = inner
            break
    weights = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    ignored = [str(k) for k, v in obj.items() if not isinstance(v, Tensor)]
    if ignored:
        log.info("%s: ignored %d non-tensor entries: %s", path, len(ignored), _listed(ignored))
    if not weights:
        raise BenchError(f"{path} contains no tensors (keys: {_listed([str(k) for k in obj])})")
    return weights


def strip_common_prefixes(state_dict: StateDict) -> StateDict:
    """Drop `module.`/`model.` when *every* key carries it (DataParallel and wrapper artefacts)."""
    while state_dict:
        prefix = next(
            (p for p in STRIP_PREFIXES if all(k.startswith(p) and len(k) > len(p) for k in state_dict)), None
        )
        if prefix is None:
            break
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def load_state_dict(
    path: str | os.PathLike[str], expected_sha256: str | None
) -> tuple[StateDict, dict[str, str]]:
    """Verify, then load a checkpoint's weights (CPU) and metadata without ever running pickled code.

    The hash is checked before any parser sees the file. `.safetensors` files return their metadata
    header; torch pickles return `{}` as metadata.
    """
    path = Path(path)
    name = path.name.lower()
    if not name.endswith((SAFETENSORS_SUFFIX, *TORCH_SUFFIXES)):
        raise BenchError(
            f"unsupported checkpoint format {path.name!r}: "
            f"use {SAFETENSORS_SUFFIX} or {', '.join(TORCH_SUFFIXES)}"
        )
    if expected_sha256 is not None:
        verify_sha256(path, expected_sha256)
    ensure_plausible_checkpoint(path)
    if name.endswith(SAFETENSORS_SUFFIX):
        weights, metadata = _read_safetensors(path)
    else:
        weights, metadata = _select_weights(_read_torch(path), path), {}
    return strip_common_prefixes(weights), metadata


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LIST_LIMIT])
    return shown + (", ..." if len(keys) > _LIST_LIMIT else "")


def _mismatch_summary(expected: Mapping[str, Tensor], given: Mapping[str, Tensor]) -> str:
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [
        f"{k}: model {tuple(expected[k].shape)} vs checkpoint {tuple(given[k].shape)}"
        for k in sorted(set(expected) & set(given))
        if expected[k].shape != given[k].shape
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_listed(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_listed(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches ({_listed(shapes)})")
    return "; ".join(parts)


def _reprefixed(expected: Mapping[str, Tensor], given: StateDict) -> StateDict | None:
    """Undo an over-eager strip: the model itself may keep everything under `model.`."""
    for prefix in STRIP_PREFIXES:
        candidate = {prefix + k: v for k, v in given.items()}
        if set(candidate) == set(expected):
            return candidate
    return None


def load_into(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    convert: Callable[[StateDict], StateDict] | None = None,
    source: str = "checkpoint",
) -> None:
    """Load weights with strict key and shape matching; any difference is an error, never a warning.

    `convert` maps a foreign key layout (e.g. the papers' MDEQ checkpoints) onto the model's.
    """
    given = dict(state_dict)
    if convert is not None:
        given = convert(given)
    expected = model.state_dict()
    if set(given) != set(expected):
        given = _reprefixed(expected, given) or given
    summary = _mismatch_summary(expected, given)
    if summary:
        raise BenchError(f"{source} does not fit {type(model).__name__}: {summary}")
    model.load_state_dict(given, strict=True)


def save_safetensors(
    path: str | os.PathLike[str], state_dict: Mapping[str, Tensor], metadata: Mapping[str, str]
) -> str:
    """Write weights as `.safetensors` atomically; returns the file's sha256 for the registry."""
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        offending = _listed([str(k) for k in bad])
        raise BenchError(f"safetensors metadata must map str to str; offending keys: {offending}")
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    data = safetensors.torch.save(tensors, metadata=dict(metadata))
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()
