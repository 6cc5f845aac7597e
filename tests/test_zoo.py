"""RobustBench zoo baselines and the autoattack alias, all offline."""

from __future__ import annotations

import builtins
import io
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from bench import zoo
from bench.compat import ensure_autoattack_alias, import_robustbench
from bench.errors import BenchError

REPO = Path(__file__).resolve().parents[1]
WONG = "robustbench:Wong2020Fast"  # PreActResNet-18: small enough to build on CPU in a test
WONG_FILE = Path("cifar10") / "Linf" / "Wong2020Fast.pt"


def _fresh_command(code: str) -> dict[str, Any]:
    """Popen arguments for `code` in a fresh interpreter, where no earlier import or alias hides a trap."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return {
        "args": [sys.executable, "-c", textwrap.dedent(code)],
        "cwd": REPO,
        "env": env,
        "stdout": subprocess.PIPE,
        "stderr": subprocess.PIPE,
        "text": True,
    }


TRAP_CODE = """
    import importlib.util, sys
    from bench import compat
    if importlib.util.find_spec("autoattack") is not None:
        print("REAL-AUTOATTACK"); raise SystemExit(0)
    had_pkg_resources = importlib.util.find_spec("pkg_resources") is not None
    if not had_pkg_resources:  # get past robustbench's other import trap to reach the autoattack one
        sys.modules["pkg_resources"] = compat._pkg_resources_stand_in()
    try:
        import robustbench
    except ModuleNotFoundError as exc:
        assert exc.name == "autoattack", exc
    else:
        raise AssertionError("robustbench imported without any autoattack module")
    # forget the half-imported robustbench (and the hand-made stand-in) so the next import starts over
    for name in [n for n in sys.modules if n == "robustbench" or n.startswith("robustbench.")]:
        del sys.modules[name]
    if not had_pkg_resources:
        del sys.modules["pkg_resources"]

    rb = compat.import_robustbench()
    from robustbench.utils import load_model
    import robustbench.loaders
    assert had_pkg_resources or "pkg_resources" not in sys.modules, "the stand-in leaked"
    path = robustbench.loaders.pkg_resources.resource_filename(
        "robustbench.loaders", "helper_files/imagenet_test_image_ids.txt")
    assert open(path).readline().strip(), path
    import pyautoattack, pyautoattack.state
    from robustbench import eval as rb_eval
    assert rb_eval.AutoAttack is pyautoattack.AutoAttack
    assert rb_eval.EvaluationState is pyautoattack.state.EvaluationState
    print("OK")
"""


@pytest.fixture(scope="module", autouse=True)
def fresh_interpreter() -> Iterator[subprocess.Popen[str]]:
    """Start the fresh-interpreter check first, so its slow robustbench import overlaps the other tests."""
    proc = subprocess.Popen(**_fresh_command(TRAP_CODE))
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def test_a_real_autoattack_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "autoattack").mkdir()
    (tmp_path / "autoattack" / "__init__.py").write_text("REAL = True\n")
    result = subprocess.run(
        **_fresh_command(
            f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from bench.compat import ensure_autoattack_alias
        assert ensure_autoattack_alias() == "autoattack"
        import autoattack
        assert autoattack.REAL
        print("OK")
        """
        ),
        timeout=60,
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]


def test_alias_submodules_are_the_same_objects() -> None:
    assert ensure_autoattack_alias() == "pyautoattack"
    assert ensure_autoattack_alias() == "pyautoattack"  # idempotent
    import autoattack
    import autoattack.autopgd_base
    import autoattack.checks
    import autoattack.fab_pt
    import autoattack.other_utils
    import autoattack.square
    import autoattack.state
    import pyautoattack
    import pyautoattack.autopgd_base
    import pyautoattack.fab_pt
    import pyautoattack.state

    assert autoattack is pyautoattack
    assert autoattack.state is pyautoattack.state
    assert autoattack.autopgd_base.APGDAttack is pyautoattack.autopgd_base.APGDAttack
    assert autoattack.fab_pt.FABAttack_PT is pyautoattack.fab_pt.FABAttack_PT
    assert sys.modules["autoattack.square"] is sys.modules["pyautoattack.square"]
    with pytest.raises(ModuleNotFoundError):
        import autoattack.no_such_submodule


# ---------------------------------------------------------------- names and info


def test_parse_defaults_and_explicit_forms() -> None:
    assert zoo.parse_zoo_name(WONG) == zoo.ZooRef("cifar10", "Linf", "Wong2020Fast")
    assert zoo.parse_zoo_name("robustbench:CIFAR10/l2/Rice2020Overfitting").canonical == (
        "robustbench:cifar10/L2/Rice2020Overfitting"
    )
    assert zoo.is_zoo_name(WONG) and not zoo.is_zoo_name("mdeq-large")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("robustbench:Wong2020Fastt", "did you mean 'Wong2020Fast'"),
        (
            "robustbench:cifar10/L2/Carmon2019Unlabeled",
            "exists as robustbench:cifar10/Linf/Carmon2019Unlabeled",
        ),
        (
            "robustbench:cifar11/Linf/Wong2020Fast",
            "unknown RobustBench dataset 'cifar11' (did you mean 'cifar10'",
        ),
        ("robustbench:cifar10/Linfinity/Wong2020Fast", "did you mean 'Linf'"),
        ("robustbench:cifar10/Wong2020Fast", "robustbench:<dataset>/<threat>/<Name>"),
        ("robustbench:", "model name is empty"),
    ],
)
def test_bad_names_get_one_helpful_line(name: str, expected: str) -> None:
    with pytest.raises(BenchError) as err:
        zoo.load_zoo_model(name, "/nonexistent-zoo-dir", allow_download=False)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_zoo_entry_info() -> None:
    info = zoo.zoo_entry_info(WONG)
    assert info.name == "robustbench:cifar10/Linf/Wong2020Fast"
    assert info.architecture == "Wong2020FastNet (PreActResNet)"
    assert (info.first_author, info.year, info.source) == ("Wong", 2020, "gdrive")
    assert info.checkpoint_files == (str(WONG_FILE),) and len(info.download_ids) == 1
    carmon = zoo.zoo_entry_info("robustbench:Carmon2019Unlabeled")
    assert carmon.architecture == "WideResNet"
    assert carmon.constructor == "WideResNet(depth=28, widen_factor=10, sub_block1=True)"
    ensemble = zoo.zoo_entry_info("robustbench:Chen2020Adversarial")
    assert ensemble.checkpoint_files[1] == "cifar10/Linf/Chen2020Adversarial.pt_m1.pt"
    assert zoo.zoo_entry_info("robustbench:Debenedetti2022Light_XCiT-S12").source == "timm"


def test_list_zoo_models() -> None:
    names = zoo.list_zoo_models()
    assert "robustbench:cifar10/Linf/Wong2020Fast" in names and len(names) > 50
    assert all(n.startswith("robustbench:cifar10/L2/") for n in zoo.list_zoo_models("cifar10", "L2"))


# ---------------------------------------------------------------- loading, offline


@pytest.fixture(scope="module")
def wong_checkpoint() -> tuple[bytes, dict[str, torch.Tensor]]:
    """A random Wong2020Fast checkpoint in robustbench's on-disk layout ('state_dict' + 'module.' keys)."""
    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    torch.manual_seed(0)
    model = model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf]["Wong2020Fast"]["model"]()
    weights = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"epoch": 15, "state_dict": {f"module.{k}": v for k, v in weights.items()}}, buffer)
    return buffer.getvalue(), weights


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Any connection attempt is recorded and fails loudly."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise AssertionError(f"network access attempted: {args[:2]!r}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def test_present_checkpoint_loads_without_network(
    tmp_path: Path, wong_checkpoint: tuple[bytes, dict[str, torch.Tensor]], no_network: list[str]
) -> None:
    data, weights = wong_checkpoint
    (tmp_path / WONG_FILE).parent.mkdir(parents=True)
    (tmp_path / WONG_FILE).write_bytes(data)
    model = zoo.load_zoo_model(WONG, tmp_path)
    assert not model.training
    loaded = model.state_dict()
    assert set(loaded) == set(weights)
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    assert no_network == []
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_missing_checkpoint_names_the_exact_file(tmp_path: Path, no_network: list[str]) -> None:
    with pytest.raises(BenchError) as err:
        zoo.load_zoo_model(WONG, tmp_path, allow_download=False)
    msg = str(err.value)
    info = zoo.zoo_entry_info(WONG)
    assert f"at {tmp_path / WONG_FILE}" in msg
    assert f"https://drive.google.com/uc?id={info.download_ids[0]}" in msg
    assert "\n" not in msg and no_network == []
    assert not (tmp_path / WONG_FILE).exists()


def test_hub_hosted_entries_respect_allow_download(no_network: list[str]) -> None:
    with pytest.raises(
        BenchError, match="fetched by timm from the Hugging Face hub, and downloads are disabled"
    ):
        zoo.load_zoo_model("robustbench:Debenedetti2022Light_XCiT-S12", allow_download=False)
    assert no_network == []


def test_missing_checkpoint_offline_fails_fast_with_the_same_advice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts: list[object] = []

    def unreachable(address, *args, **kwargs):
        attempts.append(address)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(BenchError, match="unreachable") as err:
        zoo.load_zoo_model(WONG, tmp_path)
    assert "place https://drive.google.com/uc?id=" in str(err.value)
    assert str(tmp_path / WONG_FILE) in str(err.value)
    assert attempts == [(zoo.GDRIVE_HOST, 443)]
    assert not list(tmp_path.rglob("*.pt*"))


def _fake_gdown(monkeypatch: pytest.MonkeyPatch, payload: bytes) -> list[str]:
    import gdown

    calls: list[str] = []

    def download(id: str, output: str, quiet: bool = False) -> str:
        calls.append(id)
        Path(output).write_bytes(payload)
        return output

    monkeypatch.setattr(zoo, "_reachable", lambda host, *a, **k: True)
    monkeypatch.setattr(gdown, "download", download)
    return calls


def test_download_goes_through_a_temp_file_and_rejects_web_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _fake_gdown(monkeypatch, b"<!DOCTYPE html><title>Google Drive - Quota exceeded</title>")
    with pytest.raises(BenchError, match="web page") as err:
        zoo.load_zoo_model(WONG, tmp_path)
    assert str(tmp_path / WONG_FILE) in str(err.value)
    assert len(calls) == 1
    assert not (tmp_path / WONG_FILE).exists()
    assert not list((tmp_path / WONG_FILE).parent.iterdir())  # no .part file left behind


def test_downloaded_checkpoint_is_moved_into_place_and_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wong_checkpoint: tuple[bytes, dict[str, torch.Tensor]]
) -> None:
    data, weights = wong_checkpoint
    calls = _fake_gdown(monkeypatch, data)
    model = zoo.load_zoo_model(WONG, tmp_path)
    assert calls == list(zoo.zoo_entry_info(WONG).download_ids)
    assert (tmp_path / WONG_FILE).read_bytes() == data
    assert torch.equal(model.state_dict()["linear.weight"], weights["linear.weight"])
    zoo.load_zoo_model(WONG, tmp_path)
    assert len(calls) == 1  # present now: never downloaded again


class _CreatesFile:
    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (builtins.open, (self.target, "w"))


def test_zoo_loads_are_weights_only_even_if_the_environment_says_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[str]
) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    target = tmp_path / "pwned"
    (tmp_path / WONG_FILE).parent.mkdir(parents=True)
    torch.save({"state_dict": {"x": _CreatesFile(target)}}, tmp_path / WONG_FILE)
    with pytest.raises(BenchError, match="refused to load") as err:
        zoo.load_zoo_model(WONG, tmp_path)
    assert not target.exists()
    assert str(tmp_path / WONG_FILE) in str(err.value)
    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") == "1"  # environment restored
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "empty"),
        (b"<html><body>Virus scan warning</body></html>", "web page"),
        (b"PK\x03\x04cut", "readable"),
    ],
)
def test_broken_zoo_files_give_one_line(
    tmp_path: Path, content: bytes, expected: str, no_network: list[str]
) -> None:
    (tmp_path / WONG_FILE).parent.mkdir(parents=True)
    (tmp_path / WONG_FILE).write_bytes(content)
    with pytest.raises(BenchError, match=expected) as err:
        zoo.load_zoo_model(WONG, tmp_path)
    assert str(tmp_path / WONG_FILE) in str(err.value) and "\n" not in str(err.value)


def test_checkpoint_of_the_wrong_architecture(
    tmp_path: Path, wong_checkpoint: tuple[bytes, dict[str, torch.Tensor]], no_network: list[str]
) -> None:
    _, weights = wong_checkpoint
    wrong = {k: v for k, v in weights.items() if not k.startswith("linear.")}
    wrong["linear.weight"] = torch.zeros(100, 512)
    (tmp_path / WONG_FILE).parent.mkdir(parents=True)
    torch.save({"state_dict": wrong}, tmp_path / WONG_FILE)
    with pytest.raises(BenchError, match="does not fit the zoo architecture") as err:
        zoo.load_zoo_model(WONG, tmp_path)
    assert "linear" in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- fresh interpreters (started first)


def test_robustbench_needs_the_alias_and_works_with_it(fresh_interpreter: subprocess.Popen[str]) -> None:
    """Without the alias `import robustbench` fails on `autoattack`; `import_robustbench()` fixes it, leaking
    no `pkg_resources` stand-in."""
    code, out, err = _finish(fresh_interpreter)
    if "REAL-AUTOATTACK" in out:
        pytest.skip("a real autoattack package is installed: the trap does not exist here")
    assert code == 0 and "OK" in out, err[-2000:]
