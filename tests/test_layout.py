"""The package reads as the data flow (docs/ARCHITECTURE.md): imports run down the stage order, never back up,
there are no import cycles, the library never imports the CLI, and the tests mirror the tree.

Imports inside functions count (they are dependencies all the same); imports under `if TYPE_CHECKING:` do not
(they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "protsae_cli"

#: Stage order, lowest first: a module may import only modules of its own stage or of lower ones. Longest
#: prefix wins (io.writers sits above call, which it formats; io.fasta sits at the bottom).
STAGES: list[tuple[str, ...]] = [
    ("protsae_cli", "protsae_cli.errors", "protsae_cli.logging_setup", "protsae_cli.progress"),
    ("protsae_cli.models", "protsae_cli.io", "protsae_cli.io.atomic", "protsae_cli.io.checksum", "protsae_cli.io.fasta", "protsae_cli.io.results"),
    ("protsae_cli.plm",),
    ("protsae_cli.sae",),
    ("protsae_cli.encode",),
    ("protsae_cli.labels",),
    ("protsae_cli.call",),
    ("protsae_cli.io.writers", "protsae_cli.io.merge"),
    ("protsae_cli.runtime",),
    ("protsae_cli.annotate",),
    ("protsae_cli.evaluate",),
    ("protsae_cli.train",),
    ("protsae_cli.steer",),
    ("protsae_cli.report",),
    ("protsae_cli.models.catalog",),
    ("protsae_cli.cli", "protsae_cli.__main__"),
]
RANK = {prefix: i for i, group in enumerate(STAGES) for prefix in group}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def rank(module: str) -> int:
    best, best_len = None, -1
    for prefix, r in RANK.items():
        if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
            best, best_len = r, len(prefix)
    assert best is not None, f"{module} is in no stage of tests/test_layout.py: add it where it belongs"
    return best


def imports(path: Path) -> set[str]:
    """protsae_cli modules a file imports at run time (top level or inside functions)."""
    tree = ast.parse(path.read_text())
    type_only = {id(n) for node in ast.walk(tree)
                 if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "protsae_cli":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "protsae_cli"}
    return {_existing(m) for m in found}


def _existing(name: str) -> str:
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


GRAPH = {m: imports(p) - {m} for m, p in MODULES.items()}


def test_every_module_has_a_stage():
    for m in MODULES:
        rank(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_down_the_stages(module):
    up = sorted(t for t in GRAPH[module] if rank(t) > rank(module) and not module.startswith(t + "."))
    assert not up, f"{module} (stage {rank(module)}) imports {up}, a later stage: move the shared code down"


def test_the_library_never_imports_the_cli():
    bad = {m: sorted(t for t in deps if t.startswith("protsae_cli.cli")) for m, deps in GRAPH.items()
           if not m.startswith(("protsae_cli.cli", "protsae_cli.__main__"))}
    assert not {m: d for m, d in bad.items() if d}


def test_no_import_cycles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH.get(v, ()):
            if w.startswith(v + ".") or v.startswith(w + "."):
                continue  # a package and its own modules
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in sorted(GRAPH):
        if m not in index:
            visit(m)
    assert not cycles, f"import cycles: {cycles}"


def test_the_tests_mirror_the_package():
    """A test directory per stage package, named like it (tests/<stage>/test_*.py)."""
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    test_dirs = {p.parent.name for p in (REPO / "tests").glob("*/__init__.py")}
    assert test_dirs <= packages, f"test folders without a package: {sorted(test_dirs - packages)}"
    missing = sorted(packages - test_dirs)
    assert not missing, f"packages without a tests/<name>/ folder: {missing}"
