"""The DEQ engine: solvers and trajectories, gradient estimators, readouts and the attack-facing view."""

from bench.deq.estimators import Estimator, from_paper_grammar, parse_estimator
from bench.deq.readouts import Readout, deployed_logits, parse_readout, solve_model
from bench.deq.solvers import METHODS, SolverSettings, solve
from bench.deq.trajectory import Trajectory
from bench.deq.view import AttackView, count_f_evals

__all__ = [
    "METHODS",
    "AttackView",
    "Estimator",
    "Readout",
    "SolverSettings",
    "Trajectory",
    "count_f_evals",
    "deployed_logits",
    "from_paper_grammar",
    "parse_estimator",
    "parse_readout",
    "solve",
    "solve_model",
]
