"""bench.data: files written in the real on-disk formats, read back through the real code path."""

from __future__ import annotations

import builtins
import gzip
import hashlib
import os
import pickle
import shutil
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch

import bench.data as data
from bench.data import DATASETS, ExampleSet, dataset_info, dev_test_split, load_dataset, load_dev_set
from bench.errors import BenchError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _no_system_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see only the files they write, unless a test puts the system directory back."""
    monkeypatch.setattr(data, "SYSTEM_FASHION_DIRS", ())


# --------------------------------------------------------------------------------- on-disk format writers


def _py2_cifar_pickle(images: np.ndarray, labels: list[int]) -> bytes:
    """A batch exactly as Python 2's cPickle wrote the official files: protocol 2, str opcodes, numpy.core."""
    n = images.shape[0]

    def s(b: bytes) -> bytes:  # SHORT_BINSTRING or BINSTRING (a Python 2 str)
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b

    def i(v: int) -> bytes:  # BININT
        return b"J" + struct.pack("<i", v)

    dtype = b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R"
    dtype += b"(" + i(3) + s(b"|") + b"NNN" + i(-1) + i(-1) + i(0) + b"tb"
    array = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i(0) + b"\x85" + s(b"b") + b"\x87R"
    array += b"(" + i(1) + i(n) + i(3072) + b"\x86" + dtype + b"\x89" + s(images.tobytes()) + b"tb"
    label_list = b"](" + b"".join(i(v) for v in labels) + b"e"
    body = s(b"batch_label") + s(b"testing batch 1 of 1") + s(b"labels") + label_list + s(b"data") + array
    return b"\x80\x02}(" + body + b"u."  # EMPTY_DICT, MARK, key/value pairs, SETITEMS, STOP


def _write_cifar(root: Path, split: str, images: np.ndarray, labels: np.ndarray, per_file: int = 0) -> None:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    names = ["test_batch"] if split == "test" else [f"data_batch_{k}" for k in range(1, 6)]
    per_file = per_file or len(images)
    for k, name in enumerate(names):
        sl = slice(k * per_file, (k + 1) * per_file)
        (d / name).write_bytes(_py2_cifar_pickle(images[sl], [int(v) for v in labels[sl]]))


def _idx(array: np.ndarray) -> bytes:
    head = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return head + array.astype(np.uint8).tobytes()


def _write_fashion(d: Path, split: str, images: np.ndarray, labels: np.ndarray, gz: bool = True) -> None:
    d.mkdir(parents=True, exist_ok=True)
    prefix = "t10k" if split == "test" else "train"
    for stem, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        content = _idx(arr)
        if gz:
            (d / f"{stem}.gz").write_bytes(gzip.compress(content))
        else:
            (d / stem).write_bytes(content)


def _random(n: int, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


# ----------------------------------------------------------------------------------------------- registry


def test_registry_and_unknown_names() -> None:
    assert set(DATASETS) == {"cifar10", "fashion-mnist", "fashion-mnist-builtin"}
    assert dataset_info("cifar10").eps == 8 / 255 and dataset_info("cifar10").input_shape == (3, 32, 32)
    assert dataset_info("fashion-mnist").eps == 0.1 and dataset_info("fashion-mnist").input_shape == (
        1,
        28,
        28,
    )
    assert all(len(info.class_names) == info.num_classes == 10 for info in DATASETS.values())
    with pytest.raises(BenchError, match="did you mean 'cifar10'"):
        dataset_info("cifar-10")
    with pytest.raises(BenchError, match="did you mean 'cifar10'"):
        load_dataset("cifar1O")
    with pytest.raises(BenchError, match=r"no split 'tset'.*did you mean 'test'"):
        load_dataset("fashion-mnist-builtin", split="tset")


# ----------------------------------------------------------------------------------------------- CIFAR-10


def test_cifar_python2_batch_layout_and_first_n(tmp_path: Path) -> None:
    images, labels = _random(7, (3072,), seed=0)
    _write_cifar(tmp_path, "test", images, labels)
    full = load_dataset("cifar10", data_dir=tmp_path, verify=False)
    assert full.x.shape == (7, 3, 32, 32) and full.x.dtype == torch.float32
    assert torch.equal(full.y, torch.from_numpy(labels)) and full.indices.tolist() == list(range(7))
    # row = 1024 red, then green, then blue values, each a row-major 32x32 plane
    c, h, w = 2, 5, 17
    assert full.x[3, c, h, w].item() == np.float32(images[3, 1024 * c + 32 * h + w]) / np.float32(255)
    assert float(full.x.min()) >= 0 and float(full.x.max()) <= 1
    part = load_dataset("cifar10", data_dir=tmp_path, n_examples=3, start=2, verify=False)
    assert part.indices.tolist() == [2, 3, 4]
    assert torch.equal(part.x, full.x[2:5]) and torch.equal(part.y, full.y[2:5])
    assert "md5 NOT verified" in part.source


def test_cifar_train_batches_concatenate_in_order(tmp_path: Path) -> None:
    images, labels = _random(10, (3072,), seed=1)
    _write_cifar(tmp_path / "root", "train", images, labels, per_file=2)
    out = load_dataset("cifar10", split="train", data_dir=tmp_path / "root", verify=False)
    assert out.indices.tolist() == list(range(10)) and out.y.tolist() == labels.tolist()
    assert torch.equal(out.x.mul(255).round().to(torch.uint8).reshape(10, -1), torch.from_numpy(images))


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("str_keys", [False, True])
def test_cifar_repickled_batches_load(tmp_path: Path, protocol: int, str_keys: bool) -> None:
    images, labels = _random(4, (3072,), seed=2)
    batch = {"data": images, "labels": labels.tolist()}
    if not str_keys:
        batch = {k.encode(): v for k, v in batch.items()}
    tmp_path.joinpath("test_batch").write_bytes(
        pickle.dumps(batch, protocol=protocol)
    )  # data_dir = batch dir
    out = load_dataset("cifar10", data_dir=tmp_path, verify=False)
    assert out.y.tolist() == labels.tolist()
    assert torch.equal(out.x.mul(255).round().to(torch.uint8).reshape(4, -1), torch.from_numpy(images))


def test_cifar_md5_is_checked_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = _random(3, (3072,), seed=3)
    _write_cifar(tmp_path, "test", images, labels)
    with pytest.raises(
        BenchError,
        match=r"does not match the official CIFAR-10 file test_batch \(40351d587109b95175f43aff81a1287e\)",
    ):
        load_dataset("cifar10", data_dir=tmp_path)
    real = hashlib.md5((tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes()).hexdigest()
    monkeypatch.setattr(data, "_official_cifar_md5s", lambda: {"test_batch": real})
    assert "md5 verified" in load_dataset("cifar10", data_dir=tmp_path).source


class _Evil:
    def __init__(self, call: object, args: tuple[object, ...]) -> None:
        self.call, self.args = call, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.call, self.args


@pytest.mark.parametrize("how", ["open", "system"])
def test_malicious_pickle_is_refused_without_side_effects(tmp_path: Path, how: str) -> None:
    target = tmp_path / "pwned"
    evil = (
        _Evil(builtins.open, (str(target), "w")) if how == "open" else _Evil(os.system, (f"touch {target}",))
    )
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "test_batch").write_bytes(pickle.dumps({b"data": evil, b"labels": [0]}, protocol=2))
    with pytest.raises(BenchError, match="refusing to unpickle"):
        load_dataset("cifar10", data_dir=tmp_path, verify=False)
    assert not target.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda ok: ok[: len(ok) // 2], "not a readable CIFAR-10 batch"),
        (lambda ok: pickle.dumps([1, 2]), "top level is list"),
        (lambda ok: pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}), r"\(N, 3072\)"),
        (lambda ok: pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}), "uint8"),
        (
            lambda ok: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}),
            r"shape \(1,\) for 2",
        ),
        (lambda ok: pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}), "outside 0..9"),
        (lambda ok: pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [3]}), "labels"),
    ],
)
def test_corrupt_cifar_files_give_one_clear_error(tmp_path: Path, content, message: str) -> None:
    images, labels = _random(2, (3072,), seed=4)
    good = _py2_cifar_pickle(images, labels.tolist())
    tmp_path.joinpath("test_batch").write_bytes(content(good))
    with pytest.raises(BenchError, match=message) as info:
        load_dataset("cifar10", data_dir=tmp_path, verify=False)
    assert "test_batch" in str(info.value) and "\n" not in str(info.value)


def test_missing_cifar_says_where_to_put_files(tmp_path: Path) -> None:
    with pytest.raises(BenchError) as info:
        load_dataset("cifar10", split="train", data_dir=tmp_path)
    msg = str(info.value)
    assert "cifar-10-batches-py/" in msg and "data_batch_5" in msg and str(tmp_path) in msg
    assert "--download" in msg and "\n" not in msg


def test_cifar_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.utils as tv_utils

    def offline(*args: object, **kwargs: object) -> None:
        raise URLError("[Errno -3] Temporary failure\nin name resolution")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(BenchError, match="could not download CIFAR-10") as info:
        load_dataset("cifar10", data_dir=tmp_path, download=True)
    assert "\n" not in str(info.value) and "cifar-10-batches-py" in str(info.value)

    images, labels = _random(2, (3072,), seed=5)

    def fake_download(url: str, root: str, **kwargs: object) -> None:
        _write_cifar(Path(root), "test", images, labels)

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    assert (
        load_dataset("cifar10", data_dir=tmp_path, download=True, verify=False).y.tolist() == labels.tolist()
    )


# ------------------------------------------------------------------------------------------ Fashion-MNIST


@pytest.mark.parametrize("layout", ["flat-gz", "torchvision-raw"])
def test_fashion_idx_files_gz_and_raw(tmp_path: Path, layout: str) -> None:
    images, labels = _random(6, (28, 28), seed=6)
    d = tmp_path if layout == "flat-gz" else tmp_path / "FashionMNIST" / "raw"
    _write_fashion(d, "test", images, labels, gz=layout == "flat-gz")
    out = load_dataset("fashion-mnist", data_dir=tmp_path, n_examples=4, start=1, verify=False)
    assert out.x.shape == (4, 1, 28, 28) and out.indices.tolist() == [1, 2, 3, 4]
    assert out.y.tolist() == labels[1:5].tolist()
    assert torch.equal(out.x[:, 0].mul(255).round().to(torch.uint8), torch.from_numpy(images[1:5]))
    assert str(d) in out.source and "sha256 NOT verified" in out.source
    with pytest.raises(BenchError, match="official"):
        load_dataset("fashion-mnist", data_dir=tmp_path)  # verify=True: not the official content


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda img, lbl: (b"\x08\x03" + img[2:], lbl), "bad magic"),
        (lambda img, lbl: (img[:-5], lbl), "truncated or corrupt"),
        (lambda img, lbl: (img[:2] + b"\x0d" + img[3:], lbl), "not unsigned bytes"),
        (lambda img, lbl: (_idx(np.zeros((3, 27, 28), np.uint8)), lbl), r"\(27, 28\)"),
        (lambda img, lbl: (_idx(np.zeros((3, 784), np.uint8)), lbl), "2-d array, expected 3-d"),
        (lambda img, lbl: (img, _idx(np.zeros(2, np.uint8))), "2 labels for 3 images"),
        (lambda img, lbl: (img, _idx(np.full(3, 12, np.uint8))), "outside 0..9"),
    ],
)
def test_corrupt_idx_files_give_one_clear_error(tmp_path: Path, mutate, message: str) -> None:
    images, labels = _random(3, (28, 28), seed=7)
    img, lbl = mutate(_idx(images), _idx(labels))
    tmp_path.joinpath("t10k-images-idx3-ubyte").write_bytes(img)
    tmp_path.joinpath("t10k-labels-idx1-ubyte").write_bytes(lbl)
    with pytest.raises(BenchError, match=message) as info:
        load_dataset("fashion-mnist", data_dir=tmp_path, verify=False)
    assert "idx1-ubyte" in str(info.value) or "idx3-ubyte" in str(info.value)


def test_corrupt_gzip_is_reported(tmp_path: Path) -> None:
    images, labels = _random(3, (28, 28), seed=8)
    _write_fashion(tmp_path, "train", images, labels)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(BenchError, match=r"train-images-idx3-ubyte.gz: corrupt gzip file"):
        load_dataset("fashion-mnist", split="train", data_dir=tmp_path, verify=False)


def test_fashion_falls_back_to_builtin_only_where_it_can(tmp_path: Path) -> None:
    small = load_dataset("fashion-mnist", data_dir=tmp_path, n_examples=10)
    builtin = load_dataset("fashion-mnist-builtin", n_examples=10)
    assert "built-in subset" in small.source and small.name == "fashion-mnist"
    assert torch.equal(small.x, builtin.x) and torch.equal(small.y, builtin.y)
    for kwargs in ({}, {"n_examples": 1001}, {"n_examples": 10, "start": 995}):
        with pytest.raises(
            BenchError, match=r"only the first 1000 test images are built in.*apt-get install"
        ):
            load_dataset("fashion-mnist", data_dir=tmp_path, **kwargs)
    with pytest.raises(BenchError, match=r"Fashion-MNIST train split not found.*--download"):
        load_dataset("fashion-mnist", split="train", data_dir=tmp_path)


def test_builtin_subset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_dataset("fashion-mnist-builtin")
    assert len(s) == 1000 and s.indices.tolist() == list(range(1000)) and s.split == "test"
    assert float(s.x.min()) == 0 and float(s.x.max()) == 1 and set(s.y.tolist()) == set(range(10))
    with pytest.raises(BenchError, match=r"no split 'train'"):
        load_dataset("fashion-mnist-builtin", split="train")
    # a tampered copy is refused
    for name in data.BUILTIN_FILES:
        shutil.copy(data.ASSETS_DIR / name, tmp_path / name)
    labels = tmp_path / data.BUILTIN_FILES[1]
    content = bytearray(gzip.decompress(labels.read_bytes()))
    content[-1] = (content[-1] + 1) % 10
    labels.write_bytes(gzip.compress(bytes(content)))
    monkeypatch.setattr(data, "ASSETS_DIR", tmp_path)
    with pytest.raises(BenchError, match="does not match the official file"):
        load_dataset("fashion-mnist-builtin")


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_builtin_equals_the_full_test_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "SYSTEM_FASHION_DIRS", (DEBIAN_DIR,))
    full = load_dataset("fashion-mnist", data_dir=tmp_path, n_examples=1000)  # verify=True: official content
    assert str(DEBIAN_DIR) in full.source and "sha256 verified" in full.source
    builtin = load_dataset("fashion-mnist-builtin")
    assert torch.equal(full.x, builtin.x) and torch.equal(full.y, builtin.y)
    assert torch.equal(full.indices, builtin.indices) and full.sha256() == builtin.sha256()
    assert len(load_dataset("fashion-mnist", data_dir=tmp_path)) == 10000


# ---------------------------------------------------------------------------------- example set, dev split


def test_example_set_digest_and_subset() -> None:
    s = load_dataset("fashion-mnist-builtin", n_examples=6)
    digest = s.sha256()
    assert digest == load_dataset("fashion-mnist-builtin", n_examples=6).sha256()
    x = s.x.clone()
    x[0, 0, 0, 0] += 1 / 255
    assert ExampleSet(s.name, s.split, x, s.y, s.indices, s.source).sha256() != digest
    assert ExampleSet(s.name, s.split, s.x, s.y, s.indices + 1, s.source).sha256() != digest
    sub = s.subset([4, 1])
    assert sub.indices.tolist() == [4, 1] and torch.equal(sub.x[1], s.x[1]) and sub.y[0] == s.y[4]
    with pytest.raises(ValueError, match="int64"):
        ExampleSet("n", "test", s.x, s.y[:3], s.indices, "")
    with pytest.raises(BenchError, match="has 1000 examples"):
        load_dataset("fashion-mnist-builtin", n_examples=1001)
    with pytest.raises(BenchError, match="negative"):
        load_dataset("fashion-mnist-builtin", n_examples=-1)


def test_dev_set_is_disjoint_from_reported(tmp_path: Path) -> None:
    report, dev = dev_test_split(100, 20, 80)
    assert report == range(80) and dev == range(80, 100) and not set(report) & set(dev)
    with pytest.raises(BenchError, match="do not fit disjointly"):
        dev_test_split(100, 21, 80)
    devset = load_dev_set("fashion-mnist-builtin", 100, n_report=500)
    assert devset.indices.tolist() == list(range(900, 1000)) and devset.split == "test"
    assert torch.equal(devset.x, load_dataset("fashion-mnist-builtin", start=900).x)
    with pytest.raises(BenchError, match="no train split"):
        load_dev_set("fashion-mnist-builtin", 100, n_report=950)
    # test split fully reported: the dev set comes from the end of the train split
    test_images, test_labels = _random(8, (28, 28), seed=9)
    train_images, train_labels = _random(6, (28, 28), seed=10)
    _write_fashion(tmp_path, "test", test_images, test_labels)
    _write_fashion(tmp_path, "train", train_images, train_labels)
    from_train = load_dev_set("fashion-mnist", 3, n_report=6, data_dir=tmp_path, verify=False)
    assert from_train.split == "train" and from_train.indices.tolist() == [3, 4, 5]
    assert from_train.y.tolist() == train_labels[3:].tolist()
    from_test = load_dev_set("fashion-mnist", 2, n_report=6, data_dir=tmp_path, verify=False)
    assert from_test.split == "test" and from_test.indices.tolist() == [6, 7]
