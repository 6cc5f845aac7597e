"""Run the papers' own MDEQ-Vision code in this process, on CPU, for baselines and parity fixtures.

Shared by benchmarks/papers_code_bench.py (timing) and scripts/make_papers_fixture.py (golden outputs).
Nothing of their code is copied: `repo` points at a checkout of their repository, whose directories go on
sys.path. Two repositories are supported:

    minicheshire/DEQ-White-Box-Robustness       folder deq-evaluation-with-unrolled-intermediates (NeurIPS
                                                2022: every Broyden iterate, [M|F]unroll-i-K, real)
    minicheshire/DEQ-Regulating-Neural-Dynamics folder input-entropy-reduction (ICML 2023: the defense)

Runtime shims, none editing their files: mdeq.py has one tab-indented line that Python 3 rejects
(TabError), so its source is read, its tabs expanded, and compiled in memory. Both repositories use the
same module names (config, mdeq, mdeq_core, lib.solvers), so loading one forgets the modules and path
entries of the other first. On CPU nothing else needs changing (their `.cuda()` calls sit in their driver
scripts, or on parameterless modules, where they are no-ops).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import torch

WHITE_BOX = "deq-evaluation-with-unrolled-intermediates"  # minicheshire/DEQ-White-Box-Robustness
ENTROPY = "input-entropy-reduction"  # minicheshire/DEQ-Regulating-Neural-Dynamics
YAML = {WHITE_BOX: "cls_mdeq_LARGE_reg.yaml", ENTROPY: "trades_sec33_cls_mdeq_LARGE_reg.yaml"}
_MODULE_NAMES = ("config", "mdeq", "mdeq_core", "lib", "utils", "core")
_loaded_paths: list[str] = []


def papers_root(repo: Path, subfolder: str = WHITE_BOX) -> Path:
    """The folder holding MDEQ-Vision/ and lib/ inside a checkout (or the checkout itself)."""
    for root in (repo / subfolder, repo):
        if (root / "MDEQ-Vision" / "lib" / "models" / "mdeq_core.py").is_file():
            return root
    raise SystemExit(
        f"{repo}: no {subfolder}/MDEQ-Vision/lib/models/mdeq_core.py (a checkout of their repo?)"
    )


def _import_tab_fixed(name: str, path: Path) -> ModuleType:
    """Shim: import `path` as module `name` with tabs expanded (their mdeq.py line 181 is a TabError)."""
    source = path.read_text().expandtabs(4)
    module = ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module


def _forget_previous() -> None:
    """Drop the modules and sys.path entries of a previously loaded checkout (same module names)."""
    for path in _loaded_paths:
        while path in sys.path:
            sys.path.remove(path)
    _loaded_paths.clear()
    for name in list(sys.modules):
        if name.split(".")[0] in _MODULE_NAMES:
            del sys.modules[name]


def load_papers_model(
    repo: Path,
    seed: int,
    subfolder: str = WHITE_BOX,
    opts: Sequence[str] = (),
) -> tuple[torch.nn.Module, Any]:
    """Their MDEQ classifier (random init from `seed`, eval mode, CPU) and their frozen yacs config.

    The config is their LARGE yaml with `opts` applied (yacs KEY VALUE pairs, e.g. a smaller
    MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS). Parameters take torch's default dtype at build time.
    """
    root = papers_root(repo, subfolder)
    vision = root / "MDEQ-Vision"
    _forget_previous()
    # Their import layout: tools/_init_paths.py puts MDEQ-Vision/lib first (config, utils); mdeq.py and
    # mdeq_core.py add "lib/models" and "../" relative to the working directory, for `mdeq_core` and the
    # shared `lib.solvers` / `lib.optimizations` one level up. Same directories, but absolute.
    for path in (str(root), str(vision / "lib"), str(vision / "lib" / "models")):
        sys.path.insert(0, path)
        _loaded_paths.append(path)
    from config import config, update_config  # their yacs defaults (MDEQ-Vision/lib/config)

    cfg = config.clone()
    yaml = vision / "experiments" / "cifar" / YAML[subfolder]
    args = SimpleNamespace(
        cfg=str(yaml), modelDir="", logDir="", dataDir="", testModel="", percent=1.0, opts=list(opts)
    )
    update_config(cfg, args)
    mdeq = _import_tab_fixed("mdeq", vision / "lib" / "models" / "mdeq.py")
    torch.manual_seed(seed)
    model = mdeq.get_cls_net(cfg)  # as cls_valid_observe_train.py: get_cls_net(config), their init_weights
    return model.eval(), cfg


def call(model: torch.nn.Module, x: torch.Tensor, attack_grad: str, **kwargs: Any) -> Any:
    """Their forward, called exactly as their pgd() / AutoAttack forward_pass call the model.

    Returns their (logits, final state, states) triple; `kwargs` pass e.g. for_attack to the IER model.
    """
    return model(
        x,
        train_step=-1,
        compute_jac_loss=False,
        spectral_radius_mode=False,
        writer=None,
        AttackGrad=attack_grad,
        **kwargs,
    )
