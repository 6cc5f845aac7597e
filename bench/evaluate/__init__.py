"""`bench evaluate` as a package whose modules follow the run: plan (suite -> protocols and views), views
(ViewSpec -> the module an attack sees), setup (model, data, identity), stages (early state, sweep),
execute (one batch -> columns), job (`evaluate(spec)`, top down), slurm (job arrays)."""

from bench.evaluate.job import evaluate

__all__ = ["evaluate"]
