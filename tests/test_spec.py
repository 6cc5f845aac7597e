"""The typed run specification: every flag validated once, round-trips through the record, views as types."""

from __future__ import annotations

import json
import re

import pytest

from bench.errors import BenchError
from bench.spec import (
    AttackMode,
    Batching,
    DeploySpec,
    EvalConfig,
    RunSpec,
    ViewSpec,
    format_eps,
    parse_eps,
)


def test_autoattack_expands_to_the_standard_four_in_the_spec():
    spec, _ = EvalConfig(model="m", attacks="pgd-10, autoattack").parse()
    assert spec.attacks == ("pgd-10", "apgd-ce", "apgd-t", "fab-t", "square")


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (dict(suite="fulll"), "did you mean 'full'"),
        (dict(attacks="pgd:x"), "STEPS must be a positive integer"),
        (dict(attacks="pgd,pgd:10"), "listed twice"),
        (dict(grads="state:0:1:1"), "state"),
        (dict(readouts="final,final"), "listed twice"),
        (dict(readouts="stat:2"), "readout"),
        (dict(eps="8/0"), "invalid eps"),
        (dict(batching="batch"), "unknown --batching"),
        (dict(deploy="unroll:3"), "bad --deploy"),
        (dict(deploy="unroll:3:1.5"), "lam must lie in (0, 1]"),
        (dict(n_examples=0), "--n-examples"),
        (dict(batch_size=True), "--batch-size"),
        (dict(n_dev=0), "--n-dev"),
        (dict(defense="entropy-reduction:steps=x"), "steps"),
    ],
)
def test_every_bad_flag_is_one_bench_error(raw, fragment):
    with pytest.raises(BenchError, match=re.escape(fragment)):
        EvalConfig(model="m", **raw).parse()


def test_run_spec_round_trips_through_json():
    spec, options = EvalConfig(
        model="deq-tiny",
        eps="8/255",
        suite="white-box",
        attacks=["pgd:3", "square:5"],
        grads="exact,state:2:1:1",
        readouts="final,early,ensemble-state",
        defense="entropy-reduction:steps=5",
        deploy="unroll:5:0.5",
        batching="papers",
        n_dev=8,
        seed=4,
        results_dir="elsewhere",
    ).parse()
    stored = json.loads(json.dumps(spec.to_dict()))
    assert stored["eps"] == "8/255" and stored["deploy"] == "unroll:5:0.5" and stored["batching"] == "papers"
    assert "results_dir" not in stored  # how a run is executed is not what it computes
    assert RunSpec.from_dict(stored) == spec
    assert options.results_dir == "elsewhere"
    with pytest.raises(BenchError, match="unknown run specification field"):
        RunSpec.from_dict({**stored, "colour": "red"})


def test_deploy_spec_grammar():
    assert DeploySpec.parse("fz") == DeploySpec.parse("real") == DeploySpec(0)
    assert DeploySpec.parse("unroll:9:0.5").text == "unroll:9:0.5"
    assert DeploySpec.parse("unroll:0:0.3") == DeploySpec(0)
    assert DeploySpec(0).overrides() == {"refine_apply_f": True, "refine_steps": 0, "refine_lambda": 0.5}


def test_view_labels_round_trip_and_name_the_mode():
    for view in (
        ViewSpec("final", "exact"),
        ViewSpec("state:2", "state:2:1:1", AttackMode.TRANSFER),
        ViewSpec("final", "bptt", AttackMode.ADAPTIVE),
    ):
        assert ViewSpec.from_label(view.readout, view.label) == view
    assert ViewSpec("final", "exact", AttackMode.BPDA).label == "bpda@exact"
    assert AttackMode.BPDA.defended_forward and not AttackMode.TRANSFER.defended_forward
    with pytest.raises(BenchError, match="unknown defense attack mode"):
        ViewSpec.from_label("final", "sideways@exact")


def test_eps_text_round_trips():
    for eps in (8 / 255, 0.1, 0.0, 1.0, 0.03):
        assert parse_eps(format_eps(eps)) == eps
    assert format_eps(8 / 255) == "8/255" and format_eps(0.1) == "0.1"
    assert Batching("papers") is Batching.PAPERS
