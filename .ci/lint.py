#!/usr/bin/env python
"""Lint and type-check the library: ruff (F, B, UP; settings in pyproject.toml [tool.ruff]) and mypy
([tool.mypy]) over all of protsae_cli/.

Every finding is printed. The run fails on any finding in a file not listed in PENDING below, and on a PENDING
entry that has become clean (so the list only shrinks). PENDING names the files that had findings when the
checks were introduced and have not been fixed yet, each with why; the goal is an empty list, at which point
this script is exactly `ruff check && mypy`.

Run by .ci/run and by tests/test_lint.py (so the README's one test command catches lint regressions too).
Usage: python .ci/lint.py   (exit 0 clean, 1 findings, 2 a checker is not installed)
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Files allowed to have findings, each with why (path -> reason). Empty: the library is clean, and a new finding
# anywhere fails CI. Add an entry only with a reason and an issue to remove it.
PENDING_RUFF: dict[str, str] = {}
PENDING_MYPY: dict[str, str] = {}

_MYPY_LINE = re.compile(r"^(?P<path>[^:\s]+\.py):(?P<line>\d+): error: (?P<msg>.*?)(?:\s+\[(?P<code>[\w-]+)\])?$")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def ruff_findings() -> list[tuple[str, str]]:
    """(path relative to the repository, 'line: CODE message') for every ruff finding in protsae_cli/."""
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "json", "--no-cache",
                           "protsae_cli"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"ruff failed (exit {proc.returncode}): {proc.stderr.strip()}")
    out = []
    for f in json.loads(proc.stdout or "[]"):
        path = Path(f["filename"]).resolve().relative_to(ROOT).as_posix()
        out.append((path, f"{f['location']['row']}: {f['code']} {f['message']}"))
    return out


def mypy_findings() -> list[tuple[str, str]]:
    """(path, 'line: message [code]') for every mypy error, with the files and settings of [tool.mypy]."""
    proc = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", "/dev/null",
                           "--no-error-summary", "--no-pretty", "--show-error-codes"],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"mypy failed (exit {proc.returncode}): {proc.stdout.strip()} {proc.stderr.strip()}")
    out = []
    for line in proc.stdout.splitlines():
        m = _MYPY_LINE.match(line)
        if m:
            out.append((m["path"], f"{m['line']}: {m['msg']} [{m['code']}]"))
        elif ": error:" in line:  # an error line this parser does not understand must not pass silently
            out.append(("<unparsed>", line))
    return out


def check(name: str, findings: list[tuple[str, str]], pending: dict[str, str]) -> list[str]:
    """Print the findings; return the problems that fail the run."""
    problems = []
    per_file = Counter(path for path, _ in findings)
    for path, what in findings:
        tag = "pending" if path in pending else "ERROR"
        print(f"{name} {tag} {path}:{what}")
        if path not in pending:
            problems.append(f"{name}: {path}:{what}")
    for path in sorted(pending):
        if not (ROOT / path).exists():
            problems.append(f"{name}: PENDING lists {path}, which does not exist: remove it from .ci/lint.py")
        elif per_file[path] == 0:
            problems.append(f"{name}: {path} is clean now: remove it from PENDING_{name.upper()} in .ci/lint.py")
    pend = sum(n for p, n in per_file.items() if p in pending)
    print(f"{name}: {len(findings)} finding(s), {pend} in {sum(1 for p in pending if per_file[p])} pending file(s)")
    return problems


def main() -> int:
    missing = [m for m in ("ruff", "mypy") if not _installed(m)]
    if missing:
        print(f"not installed: {', '.join(missing)} (pip install -e '.[lint]')", file=sys.stderr)
        return 2
    problems = check("ruff", ruff_findings(), PENDING_RUFF) + check("mypy", mypy_findings(), PENDING_MYPY)
    if problems:
        print("\nlint failed:\n" + "\n".join(problems), file=sys.stderr)
        return 1
    print("lint clean (outside the pending files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
