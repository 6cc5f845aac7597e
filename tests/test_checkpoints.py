"""Safe checkpoint I/O: hashes, formats, refusal of code-carrying pickles, strict key matching."""

from __future__ import annotations

import builtins
import hashlib
import logging
import pickle
from pathlib import Path

import pytest
import safetensors
import torch
from torch import nn

import bench.checkpoints as ckpt
from bench.errors import BenchError


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)


class _Wrapped(nn.Module):
    """A model whose own keys all start with `model.` (a normalisation wrapper, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _Tiny()


class _CreatesFile:
    """Unpickling this object creates `target`: the stand-in for an arbitrary-code payload."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (builtins.open, (self.target, "w"))


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = _Tiny()
    for p in model.parameters():
        nn.init.normal_(p)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    f = tmp_path / "blob.bin"
    data = bytes(range(256)) * 9000  # > 1 chunk
    f.write_bytes(data)
    assert ckpt.sha256_file(f) == hashlib.sha256(data).hexdigest()


def test_sha256_missing_file_is_bench_error(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="not found"):
        ckpt.sha256_file(tmp_path / "nope.pt")


def test_safetensors_round_trip_with_metadata(tmp_path: Path) -> None:
    weights = _weights()
    path = tmp_path / "sub" / "m.safetensors"
    digest = ckpt.save_safetensors(path, weights, {"arch": "tiny", "source": "unit test"})
    assert digest == ckpt.sha256_file(path)
    assert not [p for p in path.parent.iterdir() if p.name != "m.safetensors"]  # no temp file left behind
    loaded, meta = ckpt.load_state_dict(path, digest)
    _assert_same(loaded, weights)
    assert meta == {"arch": "tiny", "source": "unit test"}


def test_save_safetensors_handles_tied_weights(tmp_path: Path) -> None:
    shared = torch.randn(3, 3)
    path = tmp_path / "tied.safetensors"
    ckpt.save_safetensors(path, {"a": shared, "b": shared, "c": shared[0]}, {})
    loaded, _ = ckpt.load_state_dict(path, None)
    assert torch.equal(loaded["a"], shared) and torch.equal(loaded["c"], shared[0])


def test_save_safetensors_rejects_non_string_metadata(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="str to str"):
        ckpt.save_safetensors(tmp_path / "m.safetensors", _weights(), {"epochs": 3})  # type: ignore[dict-item]


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".pth.tar"])
def test_torch_pickle_loads_plain_dict(tmp_path: Path, suffix: str) -> None:
    weights = _weights(1)
    path = tmp_path / f"m{suffix}"
    torch.save(weights, path)
    loaded, meta = ckpt.load_state_dict(path, hashlib.sha256(path.read_bytes()).hexdigest().upper())
    _assert_same(loaded, weights)
    assert meta == {}


def test_nested_state_dict_and_prefix_stripping(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    weights = _weights(2)
    path = tmp_path / "trained.pth.tar"
    nested = {f"module.{k}": v for k, v in weights.items()}
    torch.save({"epoch": 90, "best_acc": 0.5, "state_dict": nested, "optimizer": {"lr": 0.1}}, path)
    with caplog.at_level(logging.INFO, logger="bench.checkpoints"):
        loaded, _ = ckpt.load_state_dict(path, None)
    _assert_same(loaded, weights)
    assert "'state_dict'" in caplog.text


@pytest.mark.parametrize("key", ["model_state_dict", "model"])
def test_other_nesting_keys(tmp_path: Path, key: str) -> None:
    weights = _weights(3)
    path = tmp_path / "m.pt"
    torch.save({key: {f"model.{k}": v for k, v in weights.items()}, "epoch": 1}, path)
    loaded, _ = ckpt.load_state_dict(path, None)
    _assert_same(loaded, weights)


def test_top_level_non_tensors_are_ignored_with_a_note(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    weights = _weights(4)
    path = tmp_path / "m.pt"
    torch.save({**weights, "epoch": 7, "arch": "tiny"}, path)
    with caplog.at_level(logging.INFO, logger="bench.checkpoints"):
        loaded, _ = ckpt.load_state_dict(path, None)
    _assert_same(loaded, weights)
    assert "ignored 2 non-tensor entries" in caplog.text and "epoch" in caplog.text


def test_prefix_only_stripped_when_every_key_has_it() -> None:
    sd = {"module.a": torch.zeros(1), "b": torch.zeros(1)}
    assert ckpt.strip_common_prefixes(sd) == sd
    both = ckpt.strip_common_prefixes({"module.model.a": torch.zeros(1), "module.model.b": torch.zeros(1)})
    assert set(both) == {"a", "b"}


def test_hash_mismatch_refused_before_any_parser_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("a parser ran before the hash check")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(safetensors, "safe_open", forbidden)
    for name in ("m.pt", "m.safetensors"):
        path = tmp_path / name
        path.write_bytes(b"whatever the content")
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        with pytest.raises(BenchError) as err:
            ckpt.load_state_dict(path, "0" * 64)
        msg = str(err.value)
        assert str(path) in msg and "0" * 64 in msg and actual in msg and "\n" not in msg


def test_malformed_expected_hash(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save(_weights(), path)
    with pytest.raises(BenchError, match="64 hex digits"):
        ckpt.load_state_dict(path, "abc")
    good = "sha256:" + ckpt.sha256_file(path)
    ckpt.load_state_dict(path, good)  # the 'sha256:' prefix is accepted


def test_malicious_payload_really_runs_under_plain_pickle(tmp_path: Path) -> None:
    """Control: proves the fixture is dangerous, so the refusal tests below can fail."""
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "x": _CreatesFile(target)}, path)
    torch.load(path, weights_only=False)
    assert target.exists()


@pytest.mark.parametrize("writer", ["torch.save", "pickle-proto2", "pickle-default"])
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, writer: str) -> None:
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"w": torch.zeros(1), "x": _CreatesFile(target)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with path.open("wb") as fh:
            pickle.dump(payload, fh, protocol=2 if writer == "pickle-proto2" else pickle.DEFAULT_PROTOCOL)
    with pytest.raises(BenchError, match=r"refused|not a readable") as err:
        ckpt.load_state_dict(path, None)
    assert not target.exists()
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    if writer == "torch.save":
        assert "open" in str(err.value) and "arbitrary code" in str(err.value)


def test_weights_only_is_forced_even_if_environment_disables_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"x": _CreatesFile(target)}, path)
    with pytest.raises(BenchError, match="refused"):
        ckpt.load_state_dict(path, None)
    assert not target.exists()


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.pt", b"", "empty"),
        (
            "page.pt",
            b"\n  <!DOCTYPE html><html><body>Google Drive - Virus scan warning</body></html>",
            "web page",
        ),
        ("page.safetensors", b"<html></html>", "web page"),
        ("garbage.pt", b"this is not a checkpoint at all" * 10, "refused|not a readable"),
        ("garbage.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", "not a valid safetensors"),
    ],
)
def test_non_checkpoints_give_one_clear_line(
    tmp_path: Path, name: str, content: bytes, expected: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BenchError, match=expected) as err:
        ckpt.load_state_dict(path, None)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_truncated_files(tmp_path: Path) -> None:
    full_pt, full_st = tmp_path / "full.pt", tmp_path / "full.safetensors"
    torch.save(_weights(), full_pt)
    ckpt.save_safetensors(full_st, _weights(), {})
    for full in (full_pt, full_st):
        cut = tmp_path / f"cut{full.suffix}"
        cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
        with pytest.raises(BenchError) as err:
            ckpt.load_state_dict(cut, None)
        assert str(cut) in str(err.value) and "\n" not in str(err.value)


def test_non_dict_payload_and_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(BenchError, match="holds a Tensor"):
        ckpt.load_state_dict(path, None)
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"x")
    with pytest.raises(BenchError, match="unsupported checkpoint format"):
        ckpt.load_state_dict(odd, None)
    with pytest.raises(BenchError, match="not found"):
        ckpt.load_state_dict(tmp_path / "missing.pt", None)


def test_load_into_exact_match_copies_weights() -> None:
    weights = _weights(5)
    model = _Tiny()
    ckpt.load_into(model, weights)
    _assert_same(model.state_dict(), weights)


def test_load_into_restores_a_stripped_wrapper_prefix(tmp_path: Path) -> None:
    source = _Wrapped()
    path = tmp_path / "wrapped.safetensors"
    ckpt.save_safetensors(path, source.state_dict(), {})
    loaded, _ = ckpt.load_state_dict(path, None)  # strips `model.`
    assert not any(k.startswith("model.") for k in loaded)
    target = _Wrapped()
    ckpt.load_into(target, loaded)
    _assert_same(target.state_dict(), source.state_dict())


def test_load_into_reports_missing_unexpected_and_shapes() -> None:
    weights = _weights(6)
    del weights["fc.weight"], weights["bn.running_mean"]
    weights["head.extra"] = torch.zeros(1)
    weights["conv.weight"] = torch.zeros(5, 3, 3, 3)
    model = _Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BenchError) as err:
        ckpt.load_into(model, weights, source="ckpt.pt")
    msg = str(err.value)
    assert msg.startswith("ckpt.pt does not fit _Tiny")
    assert "2 missing keys (bn.running_mean, fc.weight)" in msg
    assert "1 unexpected keys (head.extra)" in msg
    assert "conv.weight: model (4, 3, 3, 3) vs checkpoint (5, 3, 3, 3)" in msg
    assert "\n" not in msg
    _assert_same(model.state_dict(), before)  # nothing was half-loaded


def test_load_into_lists_only_the_first_few_keys() -> None:
    model = nn.Sequential(*[nn.Linear(1, 1) for _ in range(10)])
    with pytest.raises(
        BenchError, match=r"20 missing keys \(0\.bias, 0\.weight, 1\.bias, 1\.weight, 2\.bias, \.\.\.\)"
    ):
        ckpt.load_into(model, {})


def test_load_into_applies_convert() -> None:
    weights = _weights(7)
    renamed = {f"paper_{k}": v for k, v in weights.items()}
    model = _Tiny()
    ckpt.load_into(model, renamed, convert=lambda sd: {k.removeprefix("paper_"): v for k, v in sd.items()})
    _assert_same(model.state_dict(), weights)
    with pytest.raises(BenchError, match="unexpected keys"):
        ckpt.load_into(_Tiny(), renamed)
