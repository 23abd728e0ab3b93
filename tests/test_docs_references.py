"""The repository explains itself: every document the code and docs cite is in the repository, every cited
section exists, and nothing points at files outside it (a fresh clone has no sibling folders).

Checked in every .py and .md file of the checkout:
- `NAME.md §1.4` / `NAME.md §1.3-1.6` / `NAME.md §1.8, §3.4`: the file exists and has a heading numbered so;
- a path to a Markdown file (`docs/RESULTS.md`, `protsae_cli/models/standin_plm/README.md`) or an upper-case document
  name (`METHOD.md`): the file exists (looked up beside the citing file, in docs/, then at the root);
- relative Markdown links `[text](path)`: the target exists;
- no reference to the team's folders outside the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {"__pycache__", "build", "dist", "node_modules", "venv", "env", "site-packages"}

# A Markdown document named in text: an optional directory path, then NAME.md (upper-case names, or any name
# with a directory part). Section numbers follow as "§1.4", "§1.3-1.6", "§1.8, §3.4", "'s §1.10".
DOC = re.compile(r"(?<![\w/.$-])((?:[\w.-]+/)*[\w.-]+\.md)\b")
SECTIONS = re.compile(r"(?:'s)?(?:,?\s*§\s*(\d+(?:\.\d+)*)(?:\s*[-–]\s*(\d+(?:\.\d+)*))?)")
MD_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")

# Folders the team keeps beside the repository; built from parts so this file does not match itself.
OUTSIDE = re.compile("|".join([
    re.escape("../" + "shared"),
    re.escape("/work" + "/shared"),
    r"(?<![\w.-])" + "shared" + r"/(?:docs|data|bench|plm)\b",
    r"parents?(?:\[\d+\])?\s*/\s*[\"']" + "shared" + r"[\"']",
]))


def _files() -> list[Path]:
    out = []
    for p in sorted(ROOT.rglob("*")):
        rel = p.relative_to(ROOT)
        if any(part.startswith(".") or part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts[:-1]):
            continue
        if p.suffix in (".py", ".md") and p.is_file():
            out.append(p)
    return out


FILES = _files()


def _resolve(name: str, citing: Path) -> Path | None:
    """The file a document reference means: beside the citing file, in docs/, or from the root."""
    for base in (citing.parent, ROOT / "docs", ROOT):
        cand = (base / name).resolve()
        if cand.is_file():
            return cand
    return None


def _checked(name: str) -> bool:
    """Which names are references to documentation (not e.g. a model card a function writes)."""
    base = name.rsplit("/", 1)[-1]
    return "/" in name or re.fullmatch(r"[A-Z][A-Z0-9_]*\.md", base) is not None


def _headings(path: Path) -> set[str]:
    """Section numbers of a Markdown file: '## 1.4 Losses' -> '1.4', '## 3. Metrics' -> '3'."""
    nums = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"#{1,6}\s+§?\s*(\d+(?:\.\d+)*)\.?(?:\s|$)", line)
        if m:
            nums.add(m.group(1))
    return nums


def _references(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, document name, cited section numbers) for every documentation reference in a file."""
    refs = []
    for ln, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        for m in DOC.finditer(line):
            name = m.group(1)
            if name.startswith(("http", "www.")) or not _checked(name):
                continue
            secs: list[str] = []
            pos = m.end()
            while (s := SECTIONS.match(line, pos)) and s.end() > pos:
                secs += [x for x in s.groups() if x]
                pos = s.end()
            refs.append((ln, name, secs))
    return refs


def test_the_scan_sees_the_tree():
    names = {p.relative_to(ROOT).as_posix() for p in FILES}
    assert {"docs/METHOD.md", "protsae_cli/sae/el_loss.py", "README.md", "tests/test_docs_references.py"} <= names
    refs = [r for p in FILES if p.name == "el_loss.py" for r in _references(p)]
    assert any(name == "METHOD.md" and "1.4" in secs for _, name, secs in refs), refs


def test_reference_parser_reads_every_citation_form(tmp_path):
    doc = tmp_path / "x.py"
    doc.write_text("see METHOD.md §1.3-1.6 and docs/METHOD.md's §1.10; METHOD.md §1.8, §3.4 (ECOSYSTEM.md)\n"
                   "out / 'model_card.md' and e.md are files we write, not citations\n")
    assert _references(doc) == [(1, "METHOD.md", ["1.3", "1.6"]), (1, "docs/METHOD.md", ["1.10"]),
                                (1, "METHOD.md", ["1.8", "3.4"]), (1, "ECOSYSTEM.md", [])]


# This file names documents that do not exist on purpose (the parser's examples).
CITING = [p for p in FILES if p != Path(__file__).resolve()]


@pytest.mark.parametrize("path", CITING, ids=[p.relative_to(ROOT).as_posix() for p in CITING])
def test_cited_documents_and_sections_exist(path):
    problems = []
    for ln, name, secs in _references(path):
        target = _resolve(name, path)
        if target is None:
            problems.append(f"line {ln}: {name} is not in the repository")
            continue
        if secs:
            have = _headings(target)
            problems += [f"line {ln}: {name} has no section {s}" for s in secs if s not in have]
    if path.suffix == ".md":
        for ln, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in MD_LINK.finditer(line):
                link = m.group(1)
                if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
                    continue
                if not (path.parent / link).exists():
                    problems.append(f"line {ln}: link target {link} does not exist")
    assert not problems, f"{path.relative_to(ROOT)}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("path", FILES, ids=[p.relative_to(ROOT).as_posix() for p in FILES])
def test_nothing_points_outside_the_repository(path):
    hits = [f"line {ln}: {line.strip()}"
            for ln, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            if OUTSIDE.search(line)]
    assert not hits, f"{path.relative_to(ROOT)} refers to files outside the repository:\n  " + "\n  ".join(hits)
