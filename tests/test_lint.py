"""ruff and mypy on the library (.ci/lint.py, settings in pyproject.toml), so the README's one test command
catches lint and type regressions too; skipped with the reason where the `[lint]` extra is not installed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = ROOT / ".ci" / "lint.py"


def _load_lint():
    spec = importlib.util.spec_from_file_location("ci_lint", LINT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None or importlib.util.find_spec("mypy") is None,
                    reason="ruff or mypy not installed: pip install -e '.[lint]'")
def test_library_is_lint_and_type_clean():
    proc = subprocess.run([sys.executable, str(LINT)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]


def test_lint_gate_fails_on_new_findings_and_stale_pending_entries(capsys):
    """The gate itself: a finding outside PENDING fails, one inside is tolerated, a clean PENDING file fails."""
    lint = _load_lint()
    assert lint.check("ruff", [("protsae_cli/x.py", "1: F401 unused")], {}) != []
    pending = {"protsae_cli/errors.py": "why"}
    assert lint.check("ruff", [("protsae_cli/errors.py", "1: F401 unused")], pending) == []
    stale = lint.check("ruff", [], pending)
    assert len(stale) == 1 and "clean now" in stale[0]
    gone = lint.check("mypy", [], {"protsae_cli/no_such_module.py": "why"})
    assert len(gone) == 1 and "does not exist" in gone[0]


def test_mypy_error_lines_are_parsed():
    """An error line the parser misses would pass the gate silently."""
    lint = _load_lint()
    m = lint._MYPY_LINE.match('protsae_cli/a/b.py:12: error: Item "None" of "X | None" has no attribute "y"  '
                              "[union-attr]")
    assert m and (m["path"], m["line"], m["code"]) == ("protsae_cli/a/b.py", "12", "union-attr")


def test_pending_lists_name_only_library_files():
    lint = _load_lint()
    for path in {**lint.PENDING_RUFF, **lint.PENDING_MYPY}:
        assert path.startswith("protsae_cli/") and path.endswith(".py"), path
