"""The import graph of hybrid_twin/ (read from the source, not by importing it): no cycle, no
upward import between layers, backends independent of each other and of the dispatcher,
and no library import hidden inside a function."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "hybrid_twin"

# Lower layers never import higher ones (a module may import its own layer's modules).
LAYERS = [
    ("hybrid_twin._atomic", "hybrid_twin.errors", "hybrid_twin.models",
     "hybrid_twin.schedule"),
    ("hybrid_twin.solve._core",),
    ("hybrid_twin.solve._integrator", "hybrid_twin.solve.backend"),
    ("hybrid_twin.solve.diffrax_backend", "hybrid_twin.solve.ensemble",
     "hybrid_twin.solve.kernel"),
    ("hybrid_twin.solve.options", "hybrid_twin.solve"),
    ("hybrid_twin.simulate",),
    ("hybrid_twin.hybrid", "hybrid_twin.data", "hybrid_twin.datasets"),
    ("hybrid_twin.calibrate",),
    ("hybrid_twin.population",),
    ("hybrid_twin.config", "hybrid_twin.quickstart"),
    ("hybrid_twin.cli", "hybrid_twin"),
]
BACKENDS = ("hybrid_twin.solve.diffrax_backend", "hybrid_twin.solve.ensemble",
            "hybrid_twin.solve.kernel")


def modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def targets(mods, name: str, node) -> list[str]:
    """The hybrid_twin modules an import statement of module `name` loads."""
    if isinstance(node, ast.ImportFrom):
        pkg = name.split(".") if mods[name].name == "__init__.py" else name.split(".")[:-1]
        if node.level:
            pkg = pkg[: len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        found = [base] + [f"{base}.{a.name}" for a in node.names]
    else:
        found = [a.name for a in node.names]
    return [t for t in found if t in mods and t != name]


def graph():
    mods = modules()
    edges = {m: set() for m in mods}
    inner = []
    for name, f in mods.items():
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges[name].update(targets(mods, name, node))
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and targets(mods, name, node):
                        inner.append(f"{name}:{node.lineno}")
    return mods, edges, inner


def layer(name: str) -> int:
    best = None
    for i, group in enumerate(LAYERS):
        for prefix in group:
            if name == prefix or name.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    assert best is not None, f"{name} is in no layer: add it to LAYERS"
    return best[0]


def test_no_cycles():
    mods, edges, _ = graph()
    # package __init__ files re-export their children; the edges between modules count
    plain = {m: {t for t in ts if mods[t].name != "__init__.py"} for m, ts in edges.items()
             if mods[m].name != "__init__.py"}
    state: dict[str, int] = {}

    def visit(v, path):
        state[v] = 1
        for w in plain.get(v, ()):
            assert state.get(w) != 1, "import cycle: " + " -> ".join(path + [v, w])
            if w not in state:
                visit(w, path + [v])
        state[v] = 2

    for v in plain:
        if v not in state:
            visit(v, [])


def test_no_upward_imports_and_independent_backends():
    mods, edges, _ = graph()
    upward = [f"{m} -> {t}" for m, ts in edges.items() for t in ts if layer(t) > layer(m)]
    assert not upward, upward
    for b in BACKENDS:
        others = edges[b] & {*BACKENDS, "hybrid_twin.solve.options", "hybrid_twin.solve",
                             "hybrid_twin.simulate", "hybrid_twin.hybrid"}
        assert not others, f"{b} imports {sorted(others)}"
    # callers reach the backends only through the entry point
    for caller in ("hybrid_twin.calibrate", "hybrid_twin.population", "hybrid_twin.config"):
        assert not edges[caller] & set(BACKENDS), caller


def test_no_library_imports_inside_functions():
    _, _, inner = graph()
    assert not [i for i in inner if not i.startswith("hybrid_twin.cli:")], inner
