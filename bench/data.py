"""Data sets behind one interface: `load_dataset(name, split, ...) -> ExampleSet`.

Examples are taken in file order (first-N convention, as RobustBench's `load_cifar10`), so example `i` of a
split means the same image on every machine. Files are read by our own code: CIFAR-10's official format is a
pickle, which we load with an allow-list unpickler so a planted file cannot run code; idx files are parsed by
hand. Integrity (`verify=True`, the default): CIFAR-10 files must match the official md5s that torchvision
lists; Fashion-MNIST files must match the pinned sha256 of the official decompressed content (so any gzip
wrapper, e.g. Debian's re-compressed files, passes). `verify=False` skips only those hashes, for private or
test files; the structure (shapes, dtypes, label range) is always checked, and `ExampleSet.source` says
which checks ran.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import sys
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bench.errors import BenchError, did_you_mean
from bench.paths import ASSETS_DIR

DATA_DIR_ENV = "DEQ_BENCH_DATA"

# ---------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and an attack need to know about a data set without reading it."""

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    eps: float  # the default L-inf budget of the literature for this data set
    class_names: tuple[str, ...]
    split_sizes: Mapping[str, int]  # examples in each full split
    description: str


_CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
BUILTIN_SIZE = 1000

DATASETS: Mapping[str, DatasetInfo] = MappingProxyType(
    {
        "cifar10": DatasetInfo(
            "cifar10", (3, 32, 32), 10, 8 / 255, _CIFAR10_CLASSES, {"train": 50000, "test": 10000}, "CIFAR-10"
        ),
        "fashion-mnist": DatasetInfo(
            "fashion-mnist",
            (1, 28, 28),
            10,
            0.1,
            _FASHION_CLASSES,
            {"train": 60000, "test": 10000},
            "Fashion-MNIST (Zalando SE, MIT licence)",
        ),
        "fashion-mnist-builtin": DatasetInfo(
            "fashion-mnist-builtin",
            (1, 28, 28),
            10,
            0.1,
            _FASHION_CLASSES,
            {"test": BUILTIN_SIZE},
            "the first 1000 Fashion-MNIST test images, shipped in bench/assets/",
        ),
    }
)


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise BenchError(f"unknown data set {name!r}{did_you_mean(name, DATASETS)}")
    return DATASETS[name]


def default_data_dir() -> Path:
    """Where data sets are looked for when no directory is given; `DEQ_BENCH_DATA` overrides `./data`."""
    return Path(os.environ.get(DATA_DIR_ENV, "data"))


# ------------------------------------------------------------------------------------------ example set


@dataclass
class ExampleSet:
    """Examples of one split with their stable indices into the full split, and where they came from."""

    name: str
    split: str
    x: Tensor  # (N, C, H, W) float32 in [0, 1]
    y: Tensor  # (N,) int64
    indices: Tensor  # (N,) int64, positions in the full split in file order
    source: str = field(default="")

    def __post_init__(self) -> None:
        n = self.x.shape[0] if self.x.dim() == 4 else -1
        if self.x.dtype != torch.float32 or n < 0:
            raise ValueError(f"x must be float32 (N,C,H,W), got {self.x.dtype} {tuple(self.x.shape)}")
        for what, t in (("y", self.y), ("indices", self.indices)):
            if t.dtype != torch.int64 or tuple(t.shape) != (n,):
                raise ValueError(f"{what} must be int64 of shape ({n},), got {t.dtype} {tuple(t.shape)}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def sha256(self) -> str:
        """Digest of the exact tensors (shape, dtype and bytes of x, y, indices): what a record can cite."""
        h = hashlib.sha256()
        for t in (self.x, self.y, self.indices):
            t = t.detach().cpu().contiguous()
            h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    def subset(self, positions: Sequence[int] | Tensor) -> ExampleSet:
        """The examples at these positions of this set (not example indices), keeping their indices."""
        pos = torch.as_tensor(positions, dtype=torch.int64)
        return ExampleSet(self.name, self.split, self.x[pos], self.y[pos], self.indices[pos], self.source)


# ------------------------------------------------------------------------------------- raw split reading


@dataclass
class _RawSplit:
    images: np.ndarray  # (N, C, H, W) uint8
    labels: np.ndarray  # (N,) int64
    source: str
    builtin_fallback: bool = False
    found_in: Path | None = None  # the folder the files came from (None: built in, or a download)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise BenchError(f"cannot read {path}: {e.strerror or e}") from e


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> np.ndarray:
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise BenchError(f"{where}: labels outside 0..{num_classes - 1}: not this data set or corrupt")
    return labels


# CIFAR-10 ------------------------------------------------------------------------------------------------

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_CIFAR_URL_HINT = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Protocol-2 pickles written by Python 3 spell bytes as `_codecs.encode(str, 'latin1')`."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only callables a CIFAR batch pickle needs: numpy array/dtype reconstruction and bytes."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for core in ("numpy.core", "numpy._core"):  # py2/numpy-1 pickles name numpy.core, numpy 2 numpy._core
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _CifarUnpickler(pickle.Unpickler):
    """Refuses every global outside the allow-list, so loading a planted file cannot execute code."""

    def __init__(self, file: io.BytesIO, where: str) -> None:
        super().__init__(file, encoding="bytes")
        self._where = where
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name))
        if obj is None:
            raise BenchError(
                f"{self._where}: refusing to unpickle {module}.{name}: a CIFAR-10 batch holds only "
                "dicts, lists, bytes and numpy arrays (file is not genuine)"
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise BenchError(f"{self._where}: refusing a persistent reference: not a CIFAR-10 batch")


def _official_cifar_md5s() -> dict[str, str]:
    """The official md5 of each CIFAR-10 python file, as torchvision lists them."""
    from torchvision.datasets import CIFAR10

    listed = [*CIFAR10.train_list, *CIFAR10.test_list, [CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]
    return {fname: md5 for fname, md5 in listed}


def read_cifar_batch(path: Path, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch -> (N,3,32,32) uint8 images and (N,) int64 labels."""
    raw = _read_bytes(path)
    where = str(path)
    if verify:
        expected = _official_cifar_md5s().get(path.name)
        got = hashlib.md5(raw).hexdigest()
        if expected is None or got != expected:
            raise BenchError(
                f"{where}: md5 {got} does not match the official CIFAR-10 file {path.name} "
                f"({expected}); replace it with the official file (or pass verify=False for private data)"
            )
    try:
        obj = _CifarUnpickler(io.BytesIO(raw), where).load()
    except BenchError:
        raise
    except Exception as e:
        raise BenchError(f"{where}: not a readable CIFAR-10 batch ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise BenchError(f"{where}: not a CIFAR-10 batch (top level is {type(obj).__name__}, not a dict)")
    entries = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    data, labels = entries.get("data"), entries.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise BenchError(f"{where}: 'data' must be a uint8 array of shape (N, 3072), got {desc}")
    try:
        label_arr = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise BenchError(f"{where}: 'labels' is not a list of integers") from e
    if label_arr.shape != (data.shape[0],):
        raise BenchError(f"{where}: labels of shape {label_arr.shape} for {data.shape[0]} images")
    return data.reshape(-1, 3, 32, 32), _check_labels(label_arr, 10, where)


def _cifar_dir(data_dir: Path, split: str) -> Path | None:
    """`data_dir/cifar-10-batches-py` (torchvision's layout), or `data_dir` itself if it holds the files."""
    for d in (data_dir / _CIFAR_DIR, data_dir):
        if all((d / f).is_file() for f in _CIFAR_FILES[split]):
            return d
    return None


def _download_cifar10(root: Path) -> None:
    """torchvision's own URL and archive md5; we extract only, the batches are read by our loader."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets import utils as tv_utils

    try:
        tv_utils.download_and_extract_archive(
            CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5
        )
    except Exception as e:
        raise BenchError(
            f"could not download CIFAR-10 into {root} ({_one_line(e)}); place the official "
            f"{_CIFAR_DIR}/ folder from {_CIFAR_URL_HINT} there"
        ) from e


def _read_cifar10(split: str, data_dir: Path, download: bool, verify: bool) -> _RawSplit:
    d = _cifar_dir(data_dir, split)
    if d is None and download:
        _download_cifar10(data_dir)
        d = _cifar_dir(data_dir, split)
    if d is None:
        files = ", ".join(_CIFAR_FILES[split])
        raise BenchError(
            f"CIFAR-10 {split} split not found: place {_CIFAR_DIR}/{{{files}}} under {data_dir} "
            f"(from {_CIFAR_URL_HINT}), or pass --download"
        )
    parts = [read_cifar_batch(d / f, verify) for f in _CIFAR_FILES[split]]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    check = "md5 verified against torchvision's official list" if verify else "md5 NOT verified"
    return _RawSplit(images, labels, f"{d} ({', '.join(_CIFAR_FILES[split])}; {check})")


# idx (Fashion-MNIST) ------------------------------------------------------------------------------------

_IDX_UBYTE = 0x08


def parse_idx(raw: bytes, where: str) -> np.ndarray:
    """An idx file (magic 0,0,type,ndim; big-endian uint32 dims; payload) -> uint8 array."""
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise BenchError(f"{where}: not an idx file (bad magic number)")
    type_code, ndim = raw[2], raw[3]
    if type_code != _IDX_UBYTE:
        raise BenchError(f"{where}: idx element type 0x{type_code:02x} is not unsigned bytes (0x08)")
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise BenchError(f"{where}: idx header is truncated or has {ndim} dimensions")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise BenchError(
            f"{where}: idx header says shape {dims} ({expected} bytes) but the file holds "
            f"{len(raw) - header} data bytes (truncated or corrupt)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def encode_idx(array: np.ndarray) -> bytes:
    """uint8 array -> idx bytes (used to build the built-in subset)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return (
        bytes([0, 0, _IDX_UBYTE, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    )


def read_idx_file(path: Path) -> bytes:
    """The idx content of a file, decompressed when its name ends in .gz."""
    raw = _read_bytes(path)
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise BenchError(f"{path}: corrupt gzip file ({_one_line(e)})") from e


_FASHION_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# sha256 of the decompressed official files. The four archives of Debian's dataset-fashion-mnist package
# hold the same deflate streams as the upstream archives: re-wrapped in the upstream gzip headers they
# reproduce torchvision's official md5s exactly (scripts/make_builtin_subset.py --prove re-checks this).
FASHION_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
# Debian's dataset-fashion-mnist package; a tuple so tests can point it elsewhere.
SYSTEM_FASHION_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)

BUILTIN_FILES = (
    "fashion-mnist-t10k-first1000-images-idx3-ubyte.gz",
    "fashion-mnist-t10k-first1000-labels-idx1-ubyte.gz",
)
# sha256 of the decompressed built-in idx content, written by scripts/make_builtin_subset.py.
BUILTIN_SHA256 = dict(
    zip(
        BUILTIN_FILES,
        (
            "7a6d8e07ea021ec5bc73135ebd0a5770799557ec6f8242d8749c4f32a3cf4643",
            "b40abac7ec8228f434940f579deb7cf7b6e3103b5274cb91d1545771f5ef1c8b",
        ),
        strict=True,
    )
)


def read_fashion_pair(
    images_path: Path, labels_path: Path, hashes: Mapping[str, str] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels idx files -> (N,1,28,28) uint8, (N,) int64; `hashes` pins the content sha256."""
    arrays = []
    for path, ndim in ((images_path, 3), (labels_path, 1)):
        content = read_idx_file(path)
        if hashes is not None:
            key = path.name.removesuffix(".gz")
            expected = hashes.get(key, hashes.get(path.name))
            got = hashlib.sha256(content).hexdigest()
            if got != expected:
                raise BenchError(
                    f"{path}: content sha256 {got} does not match the official file ({expected}); "
                    "replace it (or pass verify=False for private data)"
                )
        arr = parse_idx(content, str(path))
        if arr.ndim != ndim:
            raise BenchError(f"{path}: idx holds a {arr.ndim}-d array, expected {ndim}-d")
        arrays.append(arr)
    images, labels = arrays
    if images.shape[1:] != (28, 28):
        raise BenchError(f"{images_path}: images are {images.shape[1:]}, expected (28, 28)")
    if labels.shape[0] != images.shape[0]:
        raise BenchError(f"{labels_path}: {labels.shape[0]} labels for {images.shape[0]} images")
    return images[:, None], _check_labels(labels, 10, str(labels_path))


def _find_fashion(split: str, data_dir: Path) -> tuple[Path, Path] | None:
    """The first directory holding both files of the split, plain or gzipped."""
    for d in (data_dir, data_dir / "FashionMNIST" / "raw", *SYSTEM_FASHION_DIRS):
        found = []
        for stem in _FASHION_STEMS[split]:
            cands = [p for p in (d / stem, d / f"{stem}.gz") if p.is_file()]
            if cands:
                found.append(cands[0])
        if len(found) == 2:
            return found[0], found[1]
    return None


def _fashion_missing(split: str, data_dir: Path, prefix: str = "") -> BenchError:
    img, lbl = _FASHION_STEMS[split]
    return BenchError(
        f"{prefix}Fashion-MNIST {split} split not found: place {img}[.gz] and {lbl}[.gz] in {data_dir} "
        f"(or {data_dir / 'FashionMNIST' / 'raw'}), pass --download, "
        "or `apt-get install dataset-fashion-mnist`"
    )


def _download_fashion(split: str, root: Path) -> None:
    from torchvision.datasets import FashionMNIST

    try:
        FashionMNIST(str(root), train=split == "train", download=True)
    except Exception as e:
        raise BenchError(
            f"could not download Fashion-MNIST into {root} ({_one_line(e)}); "
            f"{_fashion_missing(split, root).args[0]}"
        ) from e


def _read_builtin() -> _RawSplit:
    paths = [ASSETS_DIR / f for f in BUILTIN_FILES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise BenchError(f"the built-in Fashion-MNIST subset is missing ({missing[0]}): reinstall deq-bench")
    images, labels = read_fashion_pair(paths[0], paths[1], BUILTIN_SHA256)
    if len(images) != BUILTIN_SIZE:
        raise BenchError(f"{paths[0]}: built-in subset has {len(images)} images, expected {BUILTIN_SIZE}")
    return _RawSplit(
        images,
        labels,
        f"built-in subset {ASSETS_DIR} (first {BUILTIN_SIZE} Fashion-MNIST test images; sha256 verified)",
    )


def _read_fashion(split: str, data_dir: Path, download: bool, verify: bool) -> _RawSplit:
    """Full Fashion-MNIST files; a test-split request with nothing found falls back to the built-in subset."""
    pair = _find_fashion(split, data_dir)
    if pair is None and download:
        _download_fashion(split, data_dir)
        pair = _find_fashion(split, data_dir)
    if pair is None:
        if split == "test":
            raw = _read_builtin()
            raw.builtin_fallback = True
            return raw
        raise _fashion_missing(split, data_dir)
    images, labels = read_fashion_pair(*pair, FASHION_SHA256 if verify else None)
    check = "sha256 verified against the official content" if verify else "sha256 NOT verified"
    source = f"{pair[0].parent} ({pair[0].name}, {pair[1].name}; {check})"
    return _RawSplit(images, labels, source, found_in=pair[0].parent)


_READERS: dict[str, Callable[[str, Path, bool, bool], _RawSplit]] = {
    "cifar10": _read_cifar10,
    "fashion-mnist": _read_fashion,
    "fashion-mnist-builtin": lambda split, data_dir, download, verify: _read_builtin(),
}


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ----------------------------------------------------------------------------------------- public loaders


def _read_split(name: str, split: str, data_dir: Path | None, download: bool, verify: bool) -> _RawSplit:
    info = dataset_info(name)
    if split not in info.split_sizes:
        raise BenchError(f"{name} has no split {split!r}{did_you_mean(split, info.split_sizes)}")
    return _READERS[name](
        split, Path(data_dir) if data_dir is not None else default_data_dir(), download, verify
    )


def _make_set(name: str, split: str, raw: _RawSplit, start: int, stop: int) -> ExampleSet:
    # the same arithmetic as torchvision's ToTensor (uint8 -> float32, / 255), so pixels match RobustBench's
    x = torch.from_numpy(raw.images[start:stop].copy()).to(torch.float32).div_(255)
    y = torch.from_numpy(raw.labels[start:stop].copy())
    return ExampleSet(name, split, x, y, torch.arange(start, stop, dtype=torch.int64), raw.source)


def load_dataset(
    name: str,
    split: str = "test",
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    n_examples: int | None = None,
    start: int = 0,
    verify: bool = True,
) -> ExampleSet:
    """Examples start..start+n_examples of a split in file order (all from `start` when n_examples is None).

    `fashion-mnist` test requests that fit in the first 1000 images fall back to the built-in subset
    when no Fashion-MNIST files are found (same pixels; `source` says so). When the user named the folder
    (`data_dir`) and it does not hold the files, that is said on stderr: the numbers are the same, but the
    user expected their files to be read.
    """
    if start < 0 or (n_examples is not None and n_examples < 0):
        raise BenchError(f"start ({start}) and n_examples ({n_examples}) must not be negative")
    resolved_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    raw = _read_split(name, split, resolved_dir, download, verify)
    total = len(raw.labels)
    stop = total if n_examples is None else start + n_examples
    if raw.builtin_fallback and (n_examples is None or stop > total):
        raise _fashion_missing(split, resolved_dir, f"only the first {total} test images are built in; ")
    elsewhere = raw.found_in is not None and resolved_dir not in (raw.found_in, *raw.found_in.parents)
    if data_dir is not None and (raw.builtin_fallback or elsewhere):
        state = "does not exist" if not resolved_dir.exists() else f"holds no {name} {split} files"
        used = (
            f"the built-in subset (the same first {total} test images, sha256 verified)"
            if raw.builtin_fallback
            else f"the copy in {raw.found_in}"
        )
        print(f"warning: --data-dir {resolved_dir} {state}; using {used}", file=sys.stderr)
    if stop > total or start > total:
        raise BenchError(f"{name} {split} has {total} examples; asked for {start}..{stop - 1}")
    return _make_set(name, split, raw, start, stop)


def dev_test_split(n_total: int, n_dev: int, n_report: int) -> tuple[range, range]:
    """(reported, dev) example indices: report the first n_report, develop on the last n_dev.

    Choosing estimators on the reported examples would tune the attack to them; the two ranges never overlap.
    """
    if min(n_total, n_dev, n_report) < 0:
        raise BenchError("example counts must not be negative")
    if n_dev + n_report > n_total:
        raise BenchError(
            f"a dev set of {n_dev} and {n_report} reported examples do not fit disjointly "
            f"in {n_total} examples"
        )
    return range(n_report), range(n_total - n_dev, n_total)


def load_dev_set(
    name: str,
    n: int,
    n_report: int,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    verify: bool = True,
) -> ExampleSet:
    """Development examples disjoint from the first `n_report` test examples.

    The last `n` test examples when they do not overlap the reported ones; otherwise the last `n` training
    examples (disjoint by construction, though a model has seen them). `split` and `indices` record which.
    """
    info = dataset_info(name)
    resolved_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    test = _read_split(name, "test", resolved_dir, download, verify)
    total = len(test.labels)
    if n_report > total:
        raise BenchError(f"{name} test has {total} examples; cannot report {n_report}")
    if n + n_report <= total:
        _, dev = dev_test_split(total, n, n_report)
        return _make_set(name, "test", test, dev.start, dev.stop)
    if "train" not in info.split_sizes:
        raise BenchError(
            f"{name}: {n} dev examples do not fit beside {n_report} reported ones in its {total} test "
            "examples and it has no train split; ask for fewer"
        )
    train = _read_split(name, "train", resolved_dir, download, verify)
    if n > len(train.labels):
        raise BenchError(f"{name} train has {len(train.labels)} examples; asked for {n} dev examples")
    return _make_set(name, "train", train, len(train.labels) - n, len(train.labels))
