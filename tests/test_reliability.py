"""The tool as a user's scripts and CI meet it (#14): interrupts, concurrent runs, full disks, unwritable
paths, and corrupted or hand-edited records, batch files, manifests and baselines. Every such case is one
`error:` line and exit 2 (130/143 for interrupts), never a traceback, a wrong number or a write outside the
results directory. The property-based tests (hypothesis) mutate valid files at random."""

from __future__ import annotations

import copy
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from bench import interrupts
from bench.check import measured_metrics
from bench.errors import BenchError
from bench.evaluate import evaluate as run_spec
from bench.records.store import RunStore, run_id_of
from bench.spec import EvalConfig

ROOT = Path(__file__).resolve().parent.parent
ARGS = dict(
    model="cnn-micro", suite="quick", eps="0.03", n_examples=8, batch_size=2, device="cpu", quiet=True
)


def evaluate(results_dir: Path, **kw: Any):
    return run_spec(*EvalConfig(**{**ARGS, "results_dir": str(results_dir), **kw}).parse())


def cli(*args: str) -> tuple[int, str, str]:
    """`bench ARGS` in this process (as the console script runs it): (exit code, stdout, stderr)."""
    from bench.cli import main

    saved = {s: signal.getsignal(s) for s in interrupts.SIGNALS}
    out, err = io.StringIO(), io.StringIO()
    old_argv, sys.argv = sys.argv, ["bench", *args]
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old_argv
        for s, handler in saved.items():
            signal.signal(s, handler)
        interrupts._fired = False
    return code, out.getvalue(), err.getvalue()


def assert_error(result: tuple[int, str, str], *fragments: str) -> str:
    code, _, err = result
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _env(micro: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE"))}
    env.update(DEQ_BENCH_EXTRA_REGISTRY=str(micro), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


def _cli_args(results_dir: Path, model: str = "cnn-micro", n: int = 8) -> list[str]:
    return [
        sys.executable, "-m", "bench", "evaluate", "--model", model, "--suite", "quick", "--eps", "0.03",
        "--n-examples", str(n), "--batch-size", "2", "--device", "cpu", "--quiet",
        "--results-dir", str(results_dir),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(micro, tmp_path_factory) -> dict[str, Any]:
    """A finished cnn-micro record, and a results dir holding the same run unfinished with every batch
    present (two shards in separate folders, gathered): what `bench merge` assembles."""
    root = tmp_path_factory.mktemp("reliab")
    doc, record, _ = evaluate(root / "single")
    evaluate(root / "partial", shard="0/2")
    evaluate(root / "other", shard="1/2")
    run_id = doc["run_id"]
    src = root / "other" / ".partial" / run_id
    for f in src.glob("*.json"):
        if f.name.startswith(("batch-", "shard-")):
            shutil.copy(f, root / "partial" / ".partial" / run_id / f.name)
    return {"doc": doc, "record": record, "partial": root / "partial", "run_id": run_id}


def fresh_partial(runs: dict[str, Any], where: Path) -> Path:
    target = where / "results"
    shutil.copytree(runs["partial"], target)
    return target


def run_dir(results: Path, runs: dict[str, Any]) -> Path:
    return results / ".partial" / runs["run_id"]


def edit_json(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


# ----- interrupts -------------------------------------------------------------------------------------


def _wait_for_file(pattern: str, root: Path, proc: subprocess.Popen[str], timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not list(root.glob(pattern)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no {pattern} after {timeout} s"
        time.sleep(0.05)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_evaluate_says_so_exits_128_plus_signal_and_resumes(micro, tmp_path, signum, code):
    results = tmp_path / "r"
    proc = subprocess.Popen(
        _cli_args(results, n=64),
        env=_env(micro),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_file(".partial/*/batch-00000.json", results, proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == "error: interrupted; re-run the same command to resume", err
    assert "Traceback" not in err and out == ""
    assert not list(results.glob("*.json"))  # no record: the run is not finished
    assert not list(results.rglob("*.tmp")) and not list(results.rglob("*.lock"))  # only resumable files
    record, _, _ = evaluate(results, n_examples=64)  # the same command, here in-process
    sessions = record["provenance"]["shard_plan"]["sessions"]
    assert sessions[-1]["batches_reused"]  # the second process resumed from the first one's batches


def test_ctrl_c_during_start_up_is_the_same_clean_error(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(1.0)  # inside the imports (torch, typer, the registry)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip() == "error: interrupted; re-run the same command to resume"


needs_timers = pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs POSIX interval timers")


def _import_with_handlers(tmp_path, monkeypatch, name: str, body: str, after: float) -> Any:
    """Import a module with `body` under the CLI's signal handlers, then wait `after` seconds; returns
    the Interrupted raised (the test fails if none is)."""
    (tmp_path / f"{name}.py").write_text("import os, signal, time\n" + body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(interrupts, "_fired", False)
    monkeypatch.setattr(interrupts, "_held", None)
    handlers = {s: signal.getsignal(s) for s in (*interrupts.SIGNALS, signal.SIGALRM)}
    try:
        interrupts.install()
        with pytest.raises(interrupts.Interrupted) as caught:
            __import__(name)
            time.sleep(after)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, h in handlers.items():
            signal.signal(s, h)
    return caught.value


@needs_timers
def test_a_signal_during_an_import_is_raised_once_the_import_is_done(tmp_path, monkeypatch):
    # the start-up test above is timing-dependent; this one lands the signal inside an import for sure
    name = "module_that_gets_a_ctrl_c_while_importing"
    body = "os.kill(os.getpid(), signal.SIGINT)\ntime.sleep(0.3)\nDONE = True\n"
    caught = _import_with_handlers(tmp_path, monkeypatch, name, body, after=2.0)  # raised within 20 ms
    module = sys.modules.pop(name, None)
    assert module is not None and module.DONE  # the import ran to its end
    assert caught.exit_code == 130


@needs_timers
def test_a_second_signal_during_an_import_is_raised_at_once(tmp_path, monkeypatch):
    # a hung import must still stop: the second Ctrl-C is not held
    name = "module_that_gets_two_ctrl_c_while_importing"
    body = (
        "os.kill(os.getpid(), signal.SIGINT)\ntime.sleep(0.1)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(0.5)\nDONE = True\n"
    )
    caught = _import_with_handlers(tmp_path, monkeypatch, name, body, after=0.0)
    assert sys.modules.pop(name, None) is None  # stopped inside the import
    assert caught.exit_code == 130 and interrupts._held is None  # the first signal's code


def test_a_signal_still_held_when_the_command_ends_is_raised_then(monkeypatch):
    # `bench models` is mostly imports: it can finish before the retry timer finds it outside one
    monkeypatch.setattr(interrupts, "_fired", False)
    monkeypatch.setattr(interrupts, "_held", signal.SIGTERM)
    with pytest.raises(interrupts.Interrupted) as caught:
        interrupts.raise_held()
    assert caught.value.exit_code == 143 and interrupts._held is None
    interrupts.raise_held()  # raised once: nothing is left to raise


@pytest.mark.parametrize(
    ("raised", "code"),
    [
        (KeyboardInterrupt, 130),  # typer turns it into a returned 130, which the CLI once ignored (exit 0)
        (lambda: interrupts.Interrupted(signal.SIGTERM), 143),
        (lambda: interrupts.Interrupted(signal.SIGUSR1), 128 + signal.SIGUSR1),  # sbatch --signal=USR1
    ],
)
def test_every_interrupt_is_one_line_and_128_plus_signal(micro, monkeypatch, raised, code):
    import bench.evaluate
    import bench.train

    def stop(*args: Any, **kw: Any) -> Any:
        raise raised()

    monkeypatch.setattr(bench.evaluate, "evaluate", stop)
    monkeypatch.setattr(bench.train, "train", stop)
    result = cli("evaluate", "--model", "cnn-micro")
    assert result[0] == code and result[2] == "error: interrupted; re-run the same command to resume\n"
    result = cli("train", "--preset", "fmnist-tiny-deq-ris", "--out", "/nonexistent/x.safetensors")
    assert result[0] == code and "re-run the same command with --resume" in result[2]


# ----- concurrency ------------------------------------------------------------------------------------


def test_two_identical_evaluations_do_the_work_once_and_leave_nothing_behind(micro, tmp_path):
    results = tmp_path / "r"
    procs = [
        subprocess.Popen(
            _cli_args(results, n=64),
            env=_env(micro),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0]  # both print the one record's path
    assert sum("waiting for it to finish" in err for _, err in outs) == 1, outs
    assert len(list(results.glob("*.json"))) == 1
    assert list((results / ".partial").iterdir()) == []  # no run folder, no lock file
    record = json.loads(Path(outs[0][0].strip()).read_text())
    assert len(record["provenance"]["shard_plan"]["sessions"]) == 1  # one process did the work


def test_sharded_runs_share_the_lock(runs):
    """The shards of one run held the lock together (the fixture ran them one after the other in this
    process; test_distributed runs them in parallel); a single-process run takes it alone."""
    store = RunStore(runs["partial"], "cnn-micro", runs["run_id"])
    messages: list[str] = []
    with store.lock(shared=True, on_wait=messages.append), store.lock(shared=True, on_wait=messages.append):
        pass
    assert messages == [] and not store.lock_path.exists()


# ----- paths, names and ids ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/escaped", "a/b", "..", ".hidden", "x\ny", ""])
def test_merge_refuses_a_manifest_run_name_that_is_no_plain_name(runs, tmp_path, name):
    results = fresh_partial(runs, tmp_path / "a" / "b")
    edit_json(run_dir(results, runs) / "run.json", lambda m: m.update(run_name=name))
    before = sorted(Path("/tmp").glob("escaped*"))
    assert_error(cli("merge", "--results-dir", str(results)), "run_name")
    assert sorted(Path("/tmp").glob("escaped*")) == before and not list(tmp_path.rglob("*escaped*"))
    assert not list(results.glob("*.json"))


@pytest.mark.parametrize("run_id", ["../x", "/etc", "ABCDEF0123456789", "0123", "0123456789abcdef/.."])
def test_merge_run_id_must_be_a_plain_id(runs, tmp_path, run_id):
    results = fresh_partial(runs, tmp_path)
    assert_error(cli("merge", "--results-dir", str(results), "--run-id", run_id), "not a run id")


def test_run_store_refuses_names_and_ids_that_leave_the_results_dir(tmp_path):
    good = run_id_of({"x": 1})
    for name, run_id in (("../x", good), ("m", "../../x"), ("a/b", good), ("m", good.upper())):
        with pytest.raises(BenchError):
            RunStore(tmp_path, name, run_id)
    RunStore(tmp_path, "robustbench_Carmon2019Unlabeled", good)  # registry names, made file-safe


# ----- batch files and manifests ------------------------------------------------------------------------


def test_merge_detects_a_batch_file_copied_under_another_batchs_name(runs, tmp_path):
    results = fresh_partial(runs, tmp_path)
    partial = run_dir(results, runs)
    shutil.copy(partial / "batch-00000.json", partial / "batch-00002.json")
    line = assert_error(cli("merge", "--results-dir", str(results)), "batch-00002.json", "columns.index")
    assert "moved aside" in line and "missing 1 of 4 batches: 2" in line
    assert not (partial / "batch-00002.json").exists() and list(partial.glob("batch-00002.json.corrupt-*"))
    doc, _, reused = evaluate(results)  # the same command recomputes the batch moved aside
    assert not reused and doc["results"] == runs["doc"]["results"]


def test_resume_recomputes_a_corrupt_batch_file(runs, tmp_path, capsys):
    results = fresh_partial(runs, tmp_path)
    batch = run_dir(results, runs) / "batch-00001.json"
    edit_json(batch, lambda s: s["columns"]["attacks"][0].update(broken=["true", "false"]))
    doc, _, _ = evaluate(results)
    assert "batch-00001.json is malformed: field columns.attacks[0].broken[0]" in capsys.readouterr().err
    assert doc["results"] == runs["doc"]["results"]


def test_a_batch_file_that_is_no_json_is_recomputed_not_called_vanished(runs, tmp_path):
    results = fresh_partial(runs, tmp_path)
    (run_dir(results, runs) / "batch-00003.json").write_text("{half a fi")
    doc, _, _ = evaluate(results)
    assert doc["results"] == runs["doc"]["results"]


MANIFEST_DAMAGE = {
    "n_batches as text": lambda m: m.update(n_batches="abc"),
    "n_batches wrong": lambda m: m.update(n_batches=3),
    "spec a list": lambda m: m.update(spec=[1, 2]),
    "plan missing": lambda m: m["spec"].pop("plan"),
    "provenance missing": lambda m: m.pop("provenance"),
}


@pytest.mark.parametrize("damage", MANIFEST_DAMAGE, ids=list(MANIFEST_DAMAGE))
def test_malformed_manifest_is_one_error_line(runs, tmp_path, damage):
    results = fresh_partial(runs, tmp_path)
    edit_json(run_dir(results, runs) / "run.json", MANIFEST_DAMAGE[damage])
    assert_error(cli("merge", "--results-dir", str(results)), "run.json is malformed")
    assert not list(results.glob("*.json"))


BATCH_DAMAGE = {
    "broken as strings": lambda s: s["columns"]["attacks"][0].update(broken=["true", "false"]),
    "label short": lambda s: s["columns"]["label"].pop(),
    "index repeated": lambda s: s["columns"].update(index=[2, 2]),
    "timings not a list": lambda s: s.update(timings={"a": 1}),
    "columns missing": lambda s: s.pop("columns"),
    "attack column dropped": lambda s: s["columns"]["attacks"].pop(0),
    "a field of one column deleted": lambda s: s["columns"]["attacks"][2].pop("linf"),
    "solver stats dropped": lambda s: s["columns"].update(clean_solver={"diverged": [False, False]}),
}


@pytest.mark.parametrize("damage", BATCH_DAMAGE, ids=list(BATCH_DAMAGE))
def test_malformed_batch_file_is_reported_and_moved_aside_by_merge(runs, tmp_path, damage):
    results = fresh_partial(runs, tmp_path)
    edit_json(run_dir(results, runs) / "batch-00001.json", BATCH_DAMAGE[damage])
    line = assert_error(cli("merge", "--results-dir", str(results)), "batch-00001.json", "moved aside")
    assert "malformed" in line and not list(results.glob("*.json"))
    assert not (run_dir(results, runs) / "batch-00001.json").exists()  # the odd one, not a good one


# ----- records: leaderboard, plot, check ----------------------------------------------------------------


def _record_copy(runs: dict[str, Any], where: Path, change=None) -> Path:
    target = where / "records"
    target.mkdir(exist_ok=True)
    path = target / runs["record"].name
    shutil.copy(runs["record"], path)
    if change is not None:
        edit_json(path, change)
    return path


RECORD_DAMAGE = {
    "broken as strings": lambda d: d["results"]["columns"]["attacks"][0].update(
        broken=["true" if b else "false" for b in d["results"]["columns"]["attacks"][0]["broken"]]
    ),
    "broken as nulls": lambda d: d["results"]["columns"]["attacks"][1].update(broken=[None] * 8),
    "warnings malformed": lambda d: d["results"].update(warnings=[{"message": 5}]),
    "solver malformed": lambda d: d["results"]["columns"].update(clean_solver={"diverged": ["yes"] * 8}),
    "label as text": lambda d: d["results"]["columns"].update(label="abc"),
    "attacks dropped": lambda d: d["results"]["columns"].pop("attacks"),
}


@pytest.mark.parametrize("damage", RECORD_DAMAGE, ids=list(RECORD_DAMAGE))
def test_corrupt_record_is_one_error_line_for_every_reader(runs, tmp_path, damage):
    path = _record_copy(runs, tmp_path, RECORD_DAMAGE[damage])
    assert_error(cli("leaderboard", "--results-dir", str(path.parent)), path.name, "field")
    assert_error(cli("leaderboard", "--run", str(path), "--format", "robustbench"), path.name, "field")
    assert_error(cli("plot", "--run", str(path)), path.name, "field")
    assert_error(cli("check", "--read", str(path), "--write-baseline", str(tmp_path / "b.json")), path.name)


def test_a_damaged_finished_record_is_not_reused(runs, tmp_path):
    path = _record_copy(runs, tmp_path, RECORD_DAMAGE["broken as nulls"])
    with pytest.raises(
        BenchError, match=r"is malformed: field results\.columns\.attacks\[1\]\.broken.*--force"
    ):
        evaluate(path.parent)
    doc, _, reused = evaluate(path.parent, force=True)
    assert not reused and doc["results"] == runs["doc"]["results"]


def test_leaderboard_says_which_files_it_skipped(runs, tmp_path):
    path = _record_copy(runs, tmp_path)
    (path.parent / "notes.json").write_text('{"not": "a record"}')
    (path.parent / "broken.json").write_text("{")
    code, out, err = cli("leaderboard", "--results-dir", str(path.parent), "--format", "csv")
    assert code == 0 and "cnn-micro" in out
    assert "warning: skipped" in err and "notes.json" in err and "broken.json" in err


@pytest.fixture
def baseline(runs, tmp_path) -> Path:
    out = tmp_path / "expected.json"
    code, _, err = cli("check", "--read", str(runs["record"]), "--write-baseline", str(out))
    assert code == 0, err
    return out


def test_check_recomputes_from_the_per_example_columns(runs, tmp_path, baseline):
    # every attack column says "not broken", the stored summary still says what the attacks did
    path = _record_copy(
        runs,
        tmp_path,
        lambda d: [c.update(broken=[False] * 8) for c in d["results"]["columns"]["attacks"]],
    )
    code, out, _ = cli("check", "--baseline", str(baseline), "--read", str(path), "--tolerance", "0")
    assert code == 1 and "above: broken attack or gradient masking?" in out
    # and a record without its summary is checked all the same
    path = _record_copy(runs, tmp_path, lambda d: d["results"].pop("summary"))
    code, out, _ = cli("check", "--baseline", str(baseline), "--read", str(path), "--tolerance", "0")
    assert code == 0, out


@pytest.mark.parametrize("tolerance", ["nan", "inf", "-1"])
def test_check_tolerance_must_be_finite_and_non_negative(runs, baseline, tolerance):
    result = cli(
        "check", "--baseline", str(baseline), "--read", str(runs["record"]), f"--tolerance={tolerance}"
    )
    assert_error(result, "--tolerance")


BASELINE_DAMAGE = {
    "metrics a list": lambda b: b.update(metrics=list(b["metrics"].values())),
    "metrics as text": lambda b: b.update(metrics={k: str(v) for k, v in b["metrics"].items()}),
    "metric nan": lambda b: b["metrics"].update({"final/clean": float("nan")}),
    "n zero": lambda b: b.update(n=0),
    "n text": lambda b: b.update(n="abc"),
    "evaluation a list": lambda b: b.update(evaluation=[1]),
    "evaluation damaged": lambda b: b["evaluation"].update(n_examples="many"),
    "fingerprint text": lambda b: b.update(fingerprint="x"),
}


@pytest.mark.parametrize("damage", BASELINE_DAMAGE, ids=list(BASELINE_DAMAGE))
def test_malformed_baseline_is_one_error_line(runs, baseline, damage):
    edit_json(baseline, BASELINE_DAMAGE[damage])
    assert_error(cli("check", "--baseline", str(baseline), "--read", str(runs["record"])))
    assert_error(cli("check", "--baseline", str(baseline), "--results-dir", str(baseline.parent / "rerun")))


# ----- the user's paths -------------------------------------------------------------------------------


def test_results_dir_that_is_a_file_is_one_error_line(micro, tmp_path):
    results = tmp_path / "results"
    results.write_text("not a folder")
    args = ["evaluate", "--model", "cnn-micro", "--n-examples", "4", "--results-dir", str(results)]
    assert_error(cli(*args), str(results))
    for command in ("leaderboard", "plot", "merge"):
        assert_error(cli(command, "--results-dir", str(results)), str(results), "is not a directory")


@pytest.mark.parametrize(
    ("where", "err"),
    [("fsync", errno.EFBIG), ("fsync", errno.ENOSPC), ("mkstemp", errno.EACCES), ("mkstemp", errno.EROFS)],
)
def test_failed_writes_are_one_error_line_and_leave_no_file(runs, tmp_path, monkeypatch, where, err):
    import bench.io

    def fail(*args: Any, **kw: Any) -> Any:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(bench.io.os if where == "fsync" else bench.io.tempfile, where, fail)
    out = tmp_path / "board.csv"
    path = _record_copy(runs, tmp_path)
    line = assert_error(
        cli("leaderboard", "--results-dir", str(path.parent), "--format", "csv", "--output", str(out))
    )
    assert os.strerror(err) in line and str(tmp_path) in line
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_unwritable_output_is_one_error_line(runs, tmp_path):
    path = _record_copy(runs, tmp_path)
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file" / "board.md", tmp_path):
        assert_error(cli("leaderboard", "--results-dir", str(path.parent), "--output", str(out)), str(out))


def test_checkpoint_that_is_a_directory_says_so(micro, tmp_path):
    args = ["evaluate", "--model", "cnn-micro", "--checkpoint", str(tmp_path), "--results-dir", str(tmp_path)]
    assert_error(cli(*args), "is a directory")


def test_a_data_dir_without_the_data_set_is_said(tmp_path, capsys):
    from bench.data import load_dataset

    data = load_dataset("fashion-mnist", "test", tmp_path / "nowhere", n_examples=4)
    err = capsys.readouterr().err
    assert f"warning: --data-dir {tmp_path / 'nowhere'} does not exist; using " in err
    assert ("built-in subset" in err) == ("built-in" in data.source)  # or a system-wide copy
    load_dataset("fashion-mnist", "test", None, n_examples=4)
    assert capsys.readouterr().err == ""  # no folder named: the default search is no surprise


# ----- property-based: mutate valid files at random -----------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")
SETTINGS = hypothesis.settings(
    max_examples=60, deadline=None, suppress_health_check=list(hypothesis.HealthCheck), derandomize=True
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every location in a JSON tree (capped per list, so columns do not swamp the choice)."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:3]):
            out += _paths(v, (*prefix, i))
    return out


def _get(node: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        node = node[p]
    return node


OTHER_VALUES = [
    "true",
    None,
    1.5,
    -1,
    0,
    [],
    {},
    "x",
    True,
    False,
    [1, 2],
    float("nan"),
    "../../escaped",
    10**6,
]


@st.composite
def mutation(draw: Any, doc: Any) -> tuple[str, tuple[Any, ...], Any]:
    """(kind, location, value): replace a value by one of another kind, delete a key, or change a list's
    length (drop, duplicate); duplicates of example indices are what a copied batch looks like."""
    locations = _paths(doc)
    path = draw(st.sampled_from(locations))
    kind = draw(st.sampled_from(["replace", "delete", "drop", "duplicate"]))
    value = draw(st.sampled_from(OTHER_VALUES))
    return kind, path, value


def _apply(doc: Any, m: tuple[str, tuple[Any, ...], Any]) -> bool:
    """Apply a mutation; False when it does not change the document (then there is nothing to test)."""
    kind, path, value = m
    parent, key = _get(doc, path[:-1]), path[-1]
    old = parent[key]
    if kind == "replace":
        if value == old or (type(value) is type(old) and not isinstance(value, (list, dict, str))):
            return False  # True for False, 3 for 9: content, not a corruption of the file's types
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (value, old))
        if numbers and value == value:  # another number (NaN is always tested)
            return False
        if isinstance(old, str) and isinstance(value, str) and value != "../../escaped":
            return False  # a name for a name; the path components are what is tested
        parent[key] = copy.deepcopy(value)
    elif kind == "delete":
        if not isinstance(parent, dict):
            return False
        del parent[key]
    elif isinstance(old, list) and old:
        if kind == "drop":
            old.pop()
        else:
            old.append(copy.deepcopy(old[0]))
    else:
        return False
    return True


@SETTINGS
@hypothesis.given(data=st.data())
def test_property_mutated_records_are_refused_or_give_the_right_numbers(runs, data):
    original = json.loads(runs["record"].read_text())
    right = measured_metrics(original)
    doc = copy.deepcopy(original)
    hypothesis.assume(_apply(doc, data.draw(mutation(doc))))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "records" / runs["record"].name
        path.parent.mkdir()
        path.write_text(json.dumps(doc))
        code, out, err = cli("check", "--read", str(path), "--write-baseline", str(Path(tmp) / "b.json"))
        if code != 0:
            assert_error((code, out, err))
            return
        written = json.loads((Path(tmp) / "b.json").read_text())
        assert written["metrics"] == right  # never a wrong number
        code, out, err = cli("leaderboard", "--results-dir", str(path.parent), "--format", "json")
        assert code == 0 or assert_error((code, out, err))


def _merged_metrics(code: int, out: str, err: str, results: Path) -> dict[str, float] | None:
    if code != 0:
        assert_error((code, out, err))
        assert not list(results.glob("*.json"))  # no record from a refused merge
        return None
    (record,) = results.glob("*.json")
    return measured_metrics(json.loads(record.read_text()))


@SETTINGS
@hypothesis.given(data=st.data(), which=st.sampled_from(["run.json", "batch-00000.json", "batch-00003.json"]))
def test_property_mutated_batch_files_and_manifests_are_refused_or_merge_right(runs, data, which):
    right = measured_metrics(runs["doc"])
    with tempfile.TemporaryDirectory() as tmp:
        results = fresh_partial(runs, Path(tmp) / "a" / "b")  # '../../escaped' would land in tmp
        target = run_dir(results, runs) / which
        doc = json.loads(target.read_text())
        hypothesis.assume(_apply(doc, data.draw(mutation(doc))))
        target.write_text(json.dumps(doc))
        got = _merged_metrics(*cli("merge", "--results-dir", str(results), "--quiet"), results)
        assert got is None or got == right
        assert [p.name for p in Path(tmp).rglob("*") if results not in (p, *p.parents)] == ["a", "b"]


@SETTINGS
@hypothesis.given(data=st.data())
def test_property_mutated_baselines_are_refused_or_compared_as_written(runs, data):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "expected.json"
        assert cli("check", "--read", str(runs["record"]), "--write-baseline", str(out))[0] == 0
        doc = json.loads(out.read_text())
        hypothesis.assume(_apply(doc, data.draw(mutation(doc))))
        out.write_text(json.dumps(doc))
        code, stdout, err = cli("check", "--baseline", str(out), "--read", str(runs["record"]))
        if code == 2:
            assert_error((code, stdout, err))
        else:
            assert code in (0, 1) and "Traceback" not in err
            metrics = doc["metrics"]  # accepted: it was a baseline, and its numbers are what was compared
            assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values())
            assert isinstance(doc["n"], int) and doc["n"] >= 1
