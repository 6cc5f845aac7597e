"""The attacks and their orchestrator against closed-form answers on tiny linear models."""

from __future__ import annotations

import pytest
import torch
from attack_toys import (
    EPS,
    FlatToy,
    LinearToy,
    NoisyToy,
    RowCounter,
    SoftmaxToy,
    binary_problem,
    multiclass_problem,
)
from torch import Tensor, nn

from bench.attacks import Attack, AttackResult, mix_seed
from bench.attacks.autoattack import APGD, APGDT, FABT, Square, model_check_warnings
from bench.attacks.orchestrator import run_attacks
from bench.attacks.pgd import PGD
from bench.attacks.specs import STANDARD_AA, parse_attack, parse_attacks
from bench.errors import BenchError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The toys are tiny: intra-op threads only fight over the shared cores (3-5x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _in_threat_model(x_adv: Tensor, x: Tensor, eps: float) -> bool:
    return bool(((x_adv - x).abs().max() <= eps + 1e-7) and x_adv.min() >= 0 and x_adv.max() <= 1)


class Spy(Attack):
    """Breaks nothing; remembers which rows it was given."""

    family = "spy"

    def __init__(self, eps: float = EPS) -> None:
        self.eps = eps
        self.seen: list[Tensor] = []

    @property
    def name(self) -> str:
        return "spy"

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, seeds: Tensor) -> AttackResult:
        self.seen.append(x.clone())
        none = torch.zeros(len(x), dtype=torch.bool)
        return AttackResult(x.clone(), none, ~none, torch.zeros(len(x)), 0.0)


class Liar(Spy):
    """Returns the clean input (or an input shifted by `shift`) and claims every example broken."""

    def __init__(self, shift: float = 0.0) -> None:
        super().__init__()
        self.shift = shift

    @property
    def name(self) -> str:
        return f"liar{self.shift}"

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, seeds: Tensor) -> AttackResult:
        every = torch.ones(len(x), dtype=torch.bool)
        return AttackResult((x + self.shift).clamp(0, 1), every, every, torch.zeros(len(x)), 0.0)


@pytest.mark.parametrize("spec", ["pgd", "pgd:10:margin", "pgd:6:ce:2", "apgd-ce:10", "fab-t:5:1"])
def test_binary_linear_breaks_exactly_the_breakable_examples(spec: str) -> None:
    model, x, y, breakable = binary_problem()
    suite = run_attacks(model, x, y, [parse_attack(spec, EPS)], torch.arange(len(x)), checks=False)
    result = suite.results[parse_attack(spec, EPS).name]
    assert suite.clean_correct.all()
    assert torch.equal(result.broken, breakable)
    assert _in_threat_model(result.x_adv, x, EPS)
    assert (result.linf <= EPS + 1e-7).all()


@pytest.mark.parametrize("spec", ["pgd:10:dlr", "apgd-t:10", "fab-t:10", "apgd-dlr:10"])
def test_multiclass_linear_breaks_exactly_the_breakable_examples(spec: str) -> None:
    model, x, y, breakable = multiclass_problem(n=12)
    suite = run_attacks(model, x, y, [parse_attack(spec, EPS)], torch.arange(len(x)), checks=False)
    result = next(iter(suite.results.values()))
    assert breakable.any() and (~breakable).any()
    assert torch.equal(result.broken, breakable)
    assert _in_threat_model(result.x_adv, x, EPS)


@pytest.mark.parametrize("spec", ["pgd", "apgd-ce:5"])
def test_eps_zero_breaks_nothing(spec: str) -> None:
    model, x, y, _ = binary_problem()
    result = run_attacks(model, x, y, [parse_attack(spec, 0.0)], torch.arange(len(x)), checks=False)
    (record,) = result.results.values()
    assert record.attacked.all() and not record.broken.any()
    assert torch.equal(record.x_adv, x) and (record.linf == 0).all()


def test_every_attack_stays_in_the_ball_and_the_box_near_the_box_edges() -> None:
    model, x, y, _ = multiclass_problem(n=12)
    x = x.clone()
    x[:, 0] = 0.0  # channel 0 sits on the lower edge, channel 1 on the upper one
    x[:, 1] = 1.0
    with torch.no_grad():
        y = model(x).argmax(1)
    attacks = parse_attacks("pgd:5,apgd-ce:5,apgd-t:5:2,fab-t:5:2,square:50", EPS)
    suite = run_attacks(model, x, y, attacks, torch.arange(len(x)), independent=True, checks=False)
    for name, record in suite.results.items():
        assert record.attacked.all(), name
        assert _in_threat_model(record.x_adv, x, EPS), name
        assert torch.allclose(record.linf, (record.x_adv - x).flatten(1).abs().amax(1)), name
    assert suite.results["square:50"].forwards > 0 and suite.results["square:50"].backwards == 0
    assert suite.results["fab-t:5:2"].backwards > 0


def test_pgd_result_does_not_depend_on_the_batch() -> None:
    model, x, y, _ = binary_problem(n=8)
    seeds = torch.tensor([mix_seed(7, i) for i in range(8)])
    attack = PGD(EPS, steps=4, step_size=EPS / 8)  # small steps: unbroken rows keep random-start traces
    batch = attack.perturb(model, x, y, seeds)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    shuffled = attack.perturb(model, x[perm], y[perm], seeds[perm])
    for i in range(8):
        alone = attack.perturb(model, x[i : i + 1], y[i : i + 1], seeds[i : i + 1])
        assert torch.equal(alone.x_adv[0], batch.x_adv[i])
        assert alone.broken[0] == batch.broken[i]
    assert torch.equal(shuffled.x_adv, batch.x_adv[perm])
    other = attack.perturb(model, x, y, seeds + 1)
    assert not torch.equal(other.x_adv, batch.x_adv)  # the seeds are really used


def test_pgd_early_stop_only_computes_still_robust_examples() -> None:
    base, x, y, breakable = binary_problem(n=16)
    lazy, eager = RowCounter(base), RowCounter(base)
    seeds = torch.arange(16)
    stopped = PGD(EPS, steps=10).perturb(lazy, x, y, seeds)
    full = PGD(EPS, steps=10, early_stop=False).perturb(eager, x, y, seeds)
    assert torch.equal(stopped.broken, breakable) and torch.equal(full.broken, breakable)
    assert eager.rows == [16] * 11
    assert all(a >= b for a, b in zip(lazy.rows, lazy.rows[1:], strict=False))
    assert lazy.rows[0] == 16 and lazy.rows[-1] == int((~breakable).sum())
    assert sum(lazy.rows) < sum(eager.rows)
    assert stopped.forwards == sum(lazy.rows) and full.forwards == sum(eager.rows)
    assert full.backwards == 16 * 10


def test_sequential_suite_never_attacks_an_example_twice_once_broken() -> None:
    model, x, y, breakable = binary_problem(n=16)
    y = y.clone()
    y[-2:] = 1 - y[-2:]  # two clean-misclassified examples: never attacked
    spy = Spy()
    attacks = [parse_attack("pgd:3", EPS), parse_attack("apgd-ce:5", EPS), spy]
    suite = run_attacks(model, x, y, attacks, torch.arange(16), checks=False)
    broken_before = torch.zeros(16, dtype=torch.bool)
    for record in suite.results.values():
        assert not (record.attacked & broken_before).any()
        assert not (record.attacked & ~suite.clean_correct).any()
        assert not (record.broken & ~record.attacked).any()
        broken_before |= record.broken
    survivors = suite.clean_correct & ~broken_before
    assert torch.equal(spy.seen[0], x[survivors])
    assert torch.equal(suite.results["spy"].attacked, survivors)
    assert torch.equal(broken_before, breakable & suite.clean_correct)


def test_rows_the_attacked_model_misclassifies_unperturbed_get_their_own_warning() -> None:
    """A caller may select rows with another model (a defense's transfer mode): pyautoattack leaves the
    rows the attacked model already misclassifies unchanged, which is not a misreported attack."""
    from bench.attacks.orchestrator import UNPERTURBED_MISCLASSIFIED

    model, x, y, _ = binary_problem(n=16)
    y = y.clone()
    y[-2:] = 1 - y[-2:]  # misclassified by this model, but passed in as clean-correct
    everyone = torch.ones(16, dtype=torch.bool)
    suite = run_attacks(
        model, x, y, [parse_attack("apgd-ce:5", EPS)], torch.arange(16), everyone, checks=False
    )
    record = suite.results["apgd-ce:5"]
    assert record.broken[-2:].all() and torch.equal(record.x_adv[-2:], x[-2:])
    assert record.warnings == [f"apgd-ce:5: 2 {UNPERTURBED_MISCLASSIFIED}"]


@pytest.mark.parametrize("independent", [True, False])
def test_all_is_never_above_any_single_attack(independent: bool) -> None:
    model, x, y, _ = multiclass_problem(n=12)
    attacks = parse_attacks("pgd:2,apgd-ce:3,square:30", EPS)
    suite = run_attacks(model, x, y, attacks, torch.arange(12), independent=independent, checks=False)
    accs = suite.accuracies()
    robust_all = suite.clean_correct.clone()
    for record in suite.results.values():
        robust_all &= ~record.broken
    assert accs["all"] == robust_all.float().mean().item()
    for attack in attacks:
        assert accs["all"] <= accs[attack.name] <= accs["clean"]
        if independent:
            assert suite.results[attack.name].attacked.sum() == suite.clean_correct.sum()
    if not independent:
        values = [accs[a.name] for a in attacks]
        assert values == sorted(values, reverse=True) and values[-1] == accs["all"]


def test_record_is_decided_by_a_final_forward_not_by_the_attack() -> None:
    model, x, y, _ = binary_problem(n=8)
    suite = run_attacks(model, x, y, [Liar()], torch.arange(8), checks=False)
    record = suite.results["liar0.0"]
    assert not record.broken.any() and record.attacked.all()
    assert any("reported broken" in w for w in record.warnings)
    with pytest.raises(RuntimeError, match="left the threat model"):
        run_attacks(model, x, y, [Liar(shift=2 * EPS)], torch.arange(8), checks=False)
    tiny = run_attacks(model, x, y, [Liar(shift=EPS + 5e-7)], torch.arange(8), checks=False)
    assert (tiny.results[f"liar{EPS + 5e-7}"].linf <= EPS + 1e-7).all()  # floating slack is clipped away


@pytest.mark.parametrize(
    "attack", [APGD(EPS, n_iter=5), APGDT(EPS, n_iter=3, targets=2), FABT(EPS, 3, 2), Square(EPS, 40)]
)
def test_autoattack_components_are_reproducible_and_leave_the_global_rng_alone(attack: Attack) -> None:
    model, x, y, _ = multiclass_problem(n=6)
    seeds = torch.arange(6)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = attack.perturb(model, x, y, seeds)
    assert torch.equal(torch.rand(3), expected)
    second = attack.perturb(model, x, y, seeds)
    assert torch.equal(first.x_adv, second.x_adv)
    assert _in_threat_model(first.x_adv, x, EPS)


def test_model_checks_capture_autoattack_warnings() -> None:
    model, x, y, _ = multiclass_problem(n=8)
    assert model_check_warnings(model, x, y) == []
    assert any("randomized" in w for w in model_check_warnings(NoisyToy(model), x, y))
    assert any("probability" in w for w in model_check_warnings(SoftmaxToy(model), x, y))

    class Dynamic(nn.Module):  # an inference-time defence that differentiates in its forward
        def forward(self, t: Tensor) -> Tensor:
            with torch.enable_grad():
                t = t.detach().requires_grad_()
                g = torch.autograd.grad(model(t).sum(), t)[0]
            return model((t - 0.01 * g.sign()).detach())

    assert any("dynamic" in w for w in model_check_warnings(Dynamic(), x, y))
    assert model_check_warnings(model, x, y) == []  # pyautoattack's global counters were reset


def test_suite_records_zero_gradient_and_randomized_warnings() -> None:
    x = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    flat = FlatToy()
    y = flat(x).argmax(1)
    suite = run_attacks(flat, x, y, [APGD(EPS, n_iter=3, loss="dlr")], torch.arange(6))
    assert suite.warnings == []
    assert any("zero gradient" in w for w in suite.results["apgd-dlr:3"].warnings)
    model, xm, ym, _ = multiclass_problem(n=6)
    noisy = run_attacks(NoisyToy(model), xm, ym, [parse_attack("pgd:2", EPS)], torch.arange(6))
    assert any("randomized" in w for w in noisy.warnings)


def test_square_beating_a_gradient_masked_model_is_flagged() -> None:
    model, x, y, _ = multiclass_problem(n=12)

    class Quantized(nn.Module):  # rounding the input zeroes every gradient: PGD is blind, Square is not
        def forward(self, t: Tensor) -> Tensor:
            return model(torch.round(t * 255) / 255)

    masked = Quantized()
    with torch.no_grad():
        y = masked(x).argmax(1)
    attacks = parse_attacks("pgd:3,square:300", EPS)
    suite = run_attacks(masked, x, y, attacks, torch.arange(12), checks=False)
    accs = suite.accuracies()
    assert accs["square:300"] < accs["pgd:3"]
    assert any("Square Attack has decreased" in w for w in suite.warnings)


def test_specs_parse_to_the_documented_configurations() -> None:
    pgd = parse_attack("pgd", EPS)
    assert isinstance(pgd, PGD) and (pgd.steps, pgd.loss, pgd.restarts) == (10, "ce", 1)
    assert pgd.step_size == pytest.approx(2 / 255) and pgd.random_start and pgd.early_stop
    assert parse_attack("pgd-10", EPS).name == "pgd"
    assert parse_attack("pgd:100:ce:5", EPS).name == "pgd:100:ce:5"
    assert parse_attack("PGD:20:dlr", EPS).name == "pgd:20:dlr"
    assert parse_attack("pgd:20", 4 / 255).step_size == pytest.approx(1 / 255)
    apgd = parse_attack("apgd-ce", EPS)
    assert isinstance(apgd, APGD) and (apgd.n_iter, apgd.restarts, apgd.rho) == (100, 1, 0.75)
    target = parse_attack("apgd-t:20:3", EPS)
    assert isinstance(target, APGDT) and (target.n_iter, target.targets) == (20, 3)
    fab = parse_attack("fab-t", EPS)
    assert isinstance(fab, FABT) and (fab.n_iter, fab.targets) == (100, 9)
    square = parse_attack("square:500", EPS)
    assert isinstance(square, Square) and (square.queries, square.p_init) == (500, 0.8)
    assert [a.name for a in parse_attacks("pgd-10, autoattack", EPS)] == ["pgd", *STANDARD_AA]
    assert parse_attack("apgd-t:100:9", EPS).name == "apgd-t"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("pgb", "did you mean 'pgd'"),
        ("apgd-ce:ten", "N_ITER must be a positive integer"),
        ("pgd:10:xent", "unknown loss"),
        ("pgd:10:ce:1:value", "the loss is on deployed or estimator logits"),
        ("pgd:10:ce:1:estimator:2", "too many fields"),
        ("square:5:5", "too many fields"),
        ("pgd:0", "at least 1 step"),
        ("apgd-t:20:", "empty field"),
        ("pgd,pgd-10", "listed twice"),
        ("", "no attacks"),
    ],
)
def test_bad_specs_raise_one_readable_line(spec: str, message: str) -> None:
    with pytest.raises(BenchError, match=message) as info:
        parse_attacks(spec, EPS)
    assert "\n" not in str(info.value)


def test_impossible_configurations_raise_bench_errors() -> None:
    model, x, y, _ = binary_problem(n=4)
    with pytest.raises(BenchError, match="at least 4 classes"):
        APGDT(EPS, n_iter=2).perturb(model, x, y, torch.arange(4))
    with pytest.raises(BenchError, match="at least 3 classes"):
        PGD(EPS, steps=2, loss="dlr").perturb(model, x, y, torch.arange(4))
    with pytest.raises(BenchError, match="eps"):
        PGD(-0.1)

    class Detached(nn.Module):  # e.g. a DEQ solved under no_grad and attacked directly
        def forward(self, t: Tensor) -> Tensor:
            return model(t).detach()

    with pytest.raises(BenchError, match="no gradient"):
        PGD(EPS, steps=2).perturb(Detached(), x, y, torch.arange(4))
    with pytest.raises(BenchError, match="listed twice"):
        run_attacks(model, x, y, [PGD(EPS), PGD(EPS)], torch.arange(4))


def test_too_many_targets_are_capped_with_autoattack_warning() -> None:
    weight = torch.randn(5, 48, generator=torch.Generator().manual_seed(3))
    model = LinearToy(weight, -0.5 * weight.sum(1))
    x = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    y = model(x).argmax(1).detach()
    result = APGDT(EPS, n_iter=2, targets=9).perturb(model, x, y, torch.arange(4))
    assert any("more target classes" in w for w in result.warnings)


def test_pgd_with_the_loss_on_the_estimator_claims_only_what_the_deployed_prediction_confirms() -> None:
    from deq_toys import inputs, tanh_toy

    from bench.deq.view import AttackView, count_f_evals

    model = tanh_toy(rho=0.9, max_iter=8, tol=0.0, refine_apply_f=True, refine_steps=9).eval()
    x = inputs(12)
    with torch.no_grad():
        y = model(x).argmax(1)
    seeds = torch.arange(12)
    attack = PGD(0.3, steps=5, loss_on="estimator")
    assert attack.name == "pgd:5:ce:1:estimator" and parse_attack(attack.name, 0.3).loss_on == "estimator"
    for estimator in ("state:3:1:1", "unroll:9:0.5"):
        view = AttackView(model, "final", estimator)
        with count_f_evals(model) as count:
            suite = run_attacks(view, x, y, [attack], seeds, checks=False)
        res = suite.results[attack.name]
        assert not res.warnings  # every claim survives the orchestrator's re-check, and nothing is missed
        assert res.broken.any() and not res.broken.all()
        plain = run_attacks(view, x, y, [PGD(0.3, steps=5)], seeds, checks=False).results["pgd:5"]
        assert not plain.warnings
        assert count.rows < 12 * (1 + 5 + 2) * 19  # fewer f than a full deployed forward per step
