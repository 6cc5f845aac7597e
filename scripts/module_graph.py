"""The import graph of bench/ and models/, its layers, and the block of docs/architecture.md drawn from it.

Every `import` counts, module-level or inside a function: a lazy import hides a dependency from start-up
time, not from the design. Modules are grouped into layers that follow the data flow; a module may import
its own layer or a lower one, never a higher one, and the graph has no cycles.

    python scripts/module_graph.py            # print violations (exit 1 if any) and the layer table
    python scripts/module_graph.py --write    # also rewrite the generated block in docs/architecture.md
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bench", "models")
DOC = ROOT / "docs" / "architecture.md"
BEGIN, END = "<!-- module-graph:begin -->", "<!-- module-graph:end -->"

# (layer name, module prefixes), lowest first; a module belongs to the first layer whose prefix matches;
# "=name" matches that module alone (bench/__init__.py holds only the version)
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "base",
        (
            "=bench",
            "bench.errors",
            "bench.numbers",
            "bench.io",
            "bench.paths",
            "bench.console",
            "bench.seeds",
            "bench.progress",
            "bench.interrupts",
        ),
    ),
    ("engine", ("bench.progress", "bench.deq", "bench.attacks", "bench.defenses")),
    ("models", ("models",)),
    (
        "inputs",
        ("bench.spec", "bench.data", "bench.checkpoints", "bench.compat", "bench.stats", "bench.entries"),
    ),
    ("loading", ("bench.zoo", "bench.registry", "bench.user_models", "bench.sanity", "bench.distributed")),
    ("records", ("bench.records",)),
    ("evaluation", ("bench.evaluate", "bench.train", "bench.train_recipes")),
    ("reports", ("bench.report", "bench.check")),
    ("cli", ("bench.cli", "bench.__main__")),
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(name: str, known: set[str]) -> str | None:
    """The longest known module that `name` (a module or an attribute of one) refers to."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Project modules `path` imports anywhere in its body (`from x import y`: x, and x.y if a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            resolved = _resolve(target, known)
            if resolved is not None and resolved != me:
                found.add(resolved)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(path, known) for name, path in mods.items()}


def layer_of(module: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if module == p.removeprefix("=") or (not p.startswith("=") and module.startswith(p + ".")):
                return i
    raise KeyError(f"{module} is in no layer: add it to LAYERS in scripts/module_graph.py")


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    """'a -> b' for every import of a module in a higher layer."""
    return sorted(f"{a} -> {b}" for a, deps in g.items() for b in deps if layer_of(b) > layer_of(a))


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def _group(module: str) -> str:
    """A module's box in the drawing: its package below bench (bench.evaluate), else the module."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "bench" and len(parts) > 2 else module


def markdown(g: dict[str, set[str]]) -> str:
    """The layer table and the package-level dependency list, as docs/architecture.md shows them."""
    lines = [BEGIN, "", "| layer | modules |", "|---|---|"]
    by_layer: dict[int, list[str]] = {}
    for m in g:
        by_layer.setdefault(layer_of(m), []).append(m)
    for i, (name, _) in enumerate(LAYERS):
        mods = sorted({_group(m) for m in by_layer.get(i, [])})
        lines.append(f"| {i} {name} | {', '.join(f'`{m}`' for m in mods)} |")
    lines += ["", "Package-level imports (a box imports only boxes on its own or a lower layer):", "", "```"]
    edges: dict[str, set[str]] = {}
    for a, deps in g.items():
        for b in deps:
            if _group(a) != _group(b):
                edges.setdefault(_group(a), set()).add(_group(b))
    for a in sorted(edges, key=lambda m: (layer_of(m), m)):
        lines.append(f"{a} -> {', '.join(sorted(edges[a], key=lambda m: (layer_of(m), m)))}")
    lines += ["```", "", END]
    return "\n".join(lines)


def write_doc(g: dict[str, set[str]]) -> bool:
    """Rewrite the generated block of docs/architecture.md; True if it changed."""
    text = DOC.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    new = text[:start] + markdown(g) + text[end:]
    if new != text:
        DOC.write_text(new)
    return new != text


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--write", action="store_true", help="rewrite the block in docs/architecture.md")
    args = parser.parse_args()
    g = graph()
    bad = upward_imports(g)
    loops = cycles(g)
    for line in bad:
        print(f"upward import: {line}")
    for comp in loops:
        print(f"import cycle: {' <-> '.join(comp)}")
    print(markdown(g))
    if args.write and write_doc(g):
        print(f"rewrote the module graph in {DOC}")
    return 1 if bad or loops else 0


if __name__ == "__main__":
    sys.exit(main())
