"""Make `import autoattack` work when only pyautoattack is installed.

robustbench 1.1.1 imports `autoattack` and `autoattack.state` at package import time, but its declared
dependency, pyautoattack 0.2.0, installs the same code under the module name `pyautoattack`. Without an
alias, `import robustbench` (and so every zoo model) fails with ModuleNotFoundError.

The alias is a meta path finder: `autoattack` and `autoattack.<sub>` resolve to the *same module objects* as
`pyautoattack` and `pyautoattack.<sub>` (no second copy of any class), and only when no real `autoattack`
distribution is importable.

robustbench 1.1.1 also imports `pkg_resources` at import time (for one `resource_filename` call), which
recent setuptools (84.2.1 here) no longer ships. `import_robustbench()` supplies a minimal stand-in for
exactly that call, only for the duration of the import, so no other library sees a partial `pkg_resources`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from pathlib import Path
from types import ModuleType

ALIAS = "autoattack"
TARGET = "pyautoattack"


class _ExistingModuleLoader(importlib.abc.Loader):
    """Hands the import system a module that is already imported under its real name."""

    def __init__(self, module: ModuleType) -> None:
        self._module = module

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return self._module

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the real module already executed under its own name."""


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Resolves `autoattack[.x]` to `pyautoattack[.x]`."""

    def find_spec(self, fullname: str, path: object = None, target: object = None):
        if fullname != ALIAS and not fullname.startswith(ALIAS + "."):
            return None
        real_name = TARGET + fullname[len(ALIAS) :]
        try:
            module = importlib.import_module(real_name)
        except ModuleNotFoundError as exc:
            if exc.name == real_name:
                return None  # no such submodule: let the import fail normally under the alias name
            raise
        is_package = hasattr(module, "__path__")
        spec = importlib.machinery.ModuleSpec(fullname, _ExistingModuleLoader(module), is_package=is_package)
        if is_package:
            spec.submodule_search_locations = list(module.__path__)
        return spec


def _installed_finder() -> _AliasFinder | None:
    return next((f for f in sys.meta_path if isinstance(f, _AliasFinder)), None)


def ensure_autoattack_alias() -> str:
    """Make `import autoattack` importable; returns the module name that now backs it.

    Returns "autoattack" when a real autoattack is installed (left untouched) and "pyautoattack" when the
    alias is active. Idempotent. Raises ModuleNotFoundError when neither package is installed.
    """
    if _installed_finder() is not None:
        return TARGET
    if ALIAS in sys.modules or importlib.util.find_spec(ALIAS) is not None:
        return ALIAS
    if importlib.util.find_spec(TARGET) is None:
        raise ModuleNotFoundError(f"neither {ALIAS!r} nor {TARGET!r} is installed", name=TARGET)
    sys.meta_path.insert(0, _AliasFinder())
    return TARGET


def _pkg_resources_stand_in() -> ModuleType:
    """A `pkg_resources` providing only `resource_filename`, the one function robustbench calls."""

    def resource_filename(package_or_requirement: str, resource_name: str) -> str:
        module = importlib.import_module(package_or_requirement)
        return str(Path(module.__file__).resolve().parent / resource_name)

    stand_in = ModuleType("pkg_resources", "deq-bench stand-in used only while robustbench imports")
    stand_in.resource_filename = resource_filename  # type: ignore[attr-defined]
    return stand_in


def import_robustbench() -> ModuleType:
    """Import robustbench 1.1.1 despite its two import-time traps (autoattack name, pkg_resources).

    The deprecation warnings its dependencies (timm, torch.jit) print on import are silenced: they are
    about third-party code and would otherwise greet every `bench` run.
    """
    ensure_autoattack_alias()
    if "robustbench" in sys.modules:
        return sys.modules["robustbench"]
    stand_in = None
    if importlib.util.find_spec("pkg_resources") is None:
        stand_in = sys.modules["pkg_resources"] = _pkg_resources_stand_in()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            return importlib.import_module("robustbench")
    finally:
        if stand_in is not None and sys.modules.get("pkg_resources") is stand_in:
            del sys.modules["pkg_resources"]
