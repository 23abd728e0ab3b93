"""nextflow/: the nf-core-style modules and the shard/annotate/merge workflow.

Nextflow itself is not installable from the package registries the team's machines reach (PyPI's `nextflow`
is only the launcher script, which downloads the Nextflow jar from nextflow.io on first use; Debian has no
Nextflow package), so these tests check what can be checked without it:

* structure: balanced brackets outside strings and comments, process sections and directives, nf-core
  conventions (versions.yml in script and stub, conda environment, meta.yml), includes, params and selectors;
* Groovy syntax, where a `groovy` is installed (Debian's `groovy` package; skipped otherwise);
* the command lines: each process's `script:` and `stub:` blocks are rendered as Nextflow would (the Groovy
  expressions they use are translated and evaluated, the text de-indented), their protsae options checked
  against `protsae annotate --help` / `protsae merge --help`, and the rendered bash scripts run in staged task
  directories: three shards and a merge must reproduce a direct run exactly;
* `nextflow run -stub`, only where a `nextflow` is on PATH (skipped here).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import protsae_cli
from protsae_cli.annotate.pipeline import AnnotateOptions, Annotator
from tests.annotate.test_merge_resume import assert_same_outputs, write_fasta

yaml = pytest.importorskip("yaml")  # PyYAML comes with snakemake, part of the test extra

ROOT = Path(__file__).resolve().parents[1]
NF = ROOT / "nextflow"
MODULES = {"PROTSAE_ANNOTATE": NF / "modules/protsae/annotate", "PROTSAE_MERGE": NF / "modules/protsae/merge"}
NF_FILES = [NF / "main.nf", NF / "nextflow.config", *(d / "main.nf" for d in MODULES.values())]


# ------------------------------------------------------------------------------------------- lexing ---

def code_only(text: str) -> str:
    """The text with comments and string contents blanked (quotes kept, offsets unchanged), so brackets and
    keywords can be matched and offsets used in the original. Groovy's '...', "...", '''...''' and \"\"\"...\"\"\" strings; no slashy strings are used."""
    out, i, n = [], 0, len(text)
    while i < n:
        if text.startswith("//", i) or (i == 0 and text.startswith("#!")):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
            continue
        if text.startswith("/*", i):
            j = text.find("*/", i + 2)
            assert j >= 0, "unterminated /* comment"
            out.append(re.sub(r"[^\n]", " ", text[i:j + 2]))
            i = j + 2
            continue
        for quote in ('"""', "'''", '"', "'"):
            if text.startswith(quote, i):
                j = i + len(quote)
                while True:
                    assert j < n, f"unterminated string starting at offset {i}"
                    if text[j] == "\\":
                        j += 2
                        continue
                    if text.startswith(quote, j):
                        break
                    if len(quote) == 1:
                        assert text[j] != "\n", f"newline inside a {quote} string at offset {i}"
                    j += 1
                body = text[i + len(quote):j]
                out.append(quote + re.sub(r"[^\n]", " ", body) + quote)
                i = j + len(quote)
                break
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def check_balanced(code: str) -> None:
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for lineno, line in enumerate(code.splitlines(), 1):
        for ch in line:
            if ch in "([{":
                stack.append((ch, lineno))
            elif ch in pairs:
                assert stack and stack[-1][0] == pairs[ch], f"unbalanced {ch!r} on line {lineno}"
                stack.pop()
    assert not stack, f"unclosed {stack[-1][0]!r} from line {stack[-1][1]}"


def block(text: str, code: str, start: int) -> tuple[int, int]:
    """(first, last) offsets inside the {...} whose opening brace is the first at or after `start`."""
    i = code.index("{", start)
    depth = 0
    for j in range(i, len(code)):
        depth += {"{": 1, "}": -1}.get(code[j], 0)
        if depth == 0:
            return i + 1, j
    raise AssertionError("unclosed block")


def processes(path: Path) -> dict[str, str]:
    text = path.read_text()
    code = code_only(text)
    out = {}
    for m in re.finditer(r"^process (\w+) \{", code, re.M):
        a, b = block(text, code, m.start())
        out[m.group(1)] = text[a:b]
    return out


SECTIONS = ("input", "output", "when", "script", "stub")


def sections(body: str) -> dict[str, str]:
    """A process body split at its section labels (directives come before the first one)."""
    parts = re.split(r"^    (input|output|when|script|stub):\n", body, flags=re.M)
    out = {"directives": parts[0]}
    for k in range(1, len(parts), 2):
        out[parts[k]] = parts[k + 1]
    return out


# ------------------------------------------------------------------------------------------- structure ---

@pytest.mark.parametrize("path", NF_FILES, ids=lambda p: str(p.relative_to(NF)))
def test_files_are_balanced(path):
    check_balanced(code_only(path.read_text()))


def test_lexer_catches_what_it_claims_to():
    with pytest.raises(AssertionError, match="unclosed"):
        check_balanced(code_only('process X {\n    script:\n    """\n    echo }\n    """\n'))
    with pytest.raises(AssertionError, match="unterminated string"):
        code_only('def a = "x\\"')
    check_balanced(code_only("def s = '}' // }\n/* { */ x { y(\"${a}\") }\n"))


@pytest.mark.parametrize("name", MODULES)
def test_module_follows_nf_core_conventions(name):
    directory = MODULES[name]
    procs = processes(directory / "main.nf")
    assert list(procs) == [name], "one process per module, named like the module"
    sec = sections(procs[name])
    assert list(sec) == ["directives", *SECTIONS], f"{name}: sections in nf-core order"
    directives = sec["directives"]
    assert re.search(r"^    tag ", directives, re.M) and re.search(r"^    label 'process_\w+'$", directives, re.M)
    assert 'conda "${moduleDir}/environment.yml"' in directives
    image = re.search(r"^    container '([^']+)'$", directives, re.M).group(1)
    assert image == f"protsae:{protsae_cli.__version__}-cpu"
    assert 'path "versions.yml", emit: versions' in sec["output"]
    for part in ("script", "stub"):
        assert '"${task.process}":' in sec[part] and "protsae: \\$(protsae --version)" in sec[part], part
        assert "cat <<-END_VERSIONS > versions.yml" in sec[part]
    assert "task.ext.args" in sec["script"] and "task.ext.prefix" in sec["script"]
    assert sec["when"].strip() == "task.ext.when == null || task.ext.when"

    meta = yaml.safe_load((directory / "meta.yml").read_text())
    assert meta["name"] == name.lower()
    assert meta["tools"][0]["protsae"]["licence"] == ["MIT"]
    declared_in = re.findall(r"(?:val|path)\((\w+)", sec["input"]) + re.findall(r"^    path (\w+)$", sec["input"], re.M)
    # nf-core's meta.yml layout: one list per input channel, one {emit: [elements]} per output channel, and
    # every element with a type and a description.
    assert all(isinstance(channel, list) for channel in meta["input"])
    meta_in = [k for channel in meta["input"] for item in channel for k in item]
    assert meta_in == declared_in, f"{name}: meta.yml inputs {meta_in} != main.nf inputs {declared_in}"
    assert all(isinstance(channel, dict) and len(channel) == 1 for channel in meta["output"])
    emits = re.findall(r"emit: (\w+)", sec["output"])
    assert [next(iter(channel)) for channel in meta["output"]] == emits
    elements = [item for channel in meta["input"] for item in channel] + \
               [item for channel in meta["output"] for items in channel.values() for item in items]
    for item in elements:
        (key, spec), = item.items()
        assert spec["type"] in ("map", "file", "directory", "string", "integer") and spec["description"], key
    assert len(meta["keywords"]) >= 3 and meta["tools"][0]["protsae"]["documentation"].startswith("https://")

    env = yaml.safe_load((directory / "environment.yml").read_text())
    assert env["dependencies"] == [f"bioconda::protsae={protsae_cli.__version__}"]
    assert env["channels"] == ["conda-forge", "bioconda"] and "name" not in env  # what nf-core's lint allows


def test_workflow_includes_calls_params_and_config_agree():
    text = (NF / "main.nf").read_text()
    code = code_only(text)
    includes = re.findall(r"^include \{ (\w+) \} from '([^']+)'$", text, re.M)
    assert {n for n, _ in includes} == set(MODULES)
    for name, rel in includes:
        assert (NF / (rel + ".nf")).resolve() == (MODULES[name] / "main.nf").resolve()
        n_inputs = len([line for line in sections(processes(MODULES[name] / "main.nf")[name])["input"].splitlines()
                        if line.strip()])
        call = re.search(rf"^    {name}\(([^)]*)\)$", text, re.M)
        assert call, f"{name} is not called"
        assert len(call.group(1).split(",")) == n_inputs, f"{name} takes {n_inputs} inputs: {call.group(0)}"
    assert "--shard" not in code  # the workflow hands shard numbers in meta; the module builds the option

    config = (NF / "nextflow.config").read_text()
    ccode = code_only(config)
    a, b = block(config, ccode, ccode.index("params {"))
    declared = set(re.findall(r"^    (\w+) = ", config[a:b], re.M))
    used = set(re.findall(r"params\.(\w+)", code_only(text))) | set(re.findall(r"params\.(\w+)", ccode))
    assert used <= declared, f"params used but not declared in nextflow.config: {sorted(used - declared)}"
    assert {"input", "n_shards", "outdir", "sae", "model", "annotate_args", "formats"} <= declared
    assert set(re.findall(r"withName: '(\w+)'", config)) == set(MODULES)
    profiles = set(re.findall(r"^    (\w+) \{$", config[block(config, ccode, ccode.index("profiles {"))[0]:], re.M))
    assert {"docker", "apptainer", "singularity", "conda", "gpu", "test"} <= profiles
    assert "(130..145) + 104" in config  # protsae's exit 140 (out of memory) is retried
    test_input = re.search(r'params\.input = "\$\{projectDir\}/([^"]+)"', config).group(1)
    assert (NF / test_input).resolve().is_file()


def _java_home() -> str | None:
    java = shutil.which("java")
    return str(Path(java).resolve().parents[1]) if java else None


GROOVY_PARSE = r"""
import org.codehaus.groovy.control.*
int bad = 0
args.each { f ->
    def unit = new CompilationUnit()
    unit.addSource(new File(f))
    try { unit.compile(Phases.CONVERSION) } catch (Exception e) { bad++; System.err.println(e.message) }
}
System.exit(bad ? 1 : 0)
"""


@pytest.mark.skipif(shutil.which("groovy") is None or _java_home() is None,
                    reason="no groovy/java (apt-get install groovy): Groovy syntax not checked")
def test_groovy_parses_every_file(tmp_path):
    """Nextflow scripts and configs are Groovy: the parser must accept them (syntax, not Nextflow semantics)."""
    script = tmp_path / "parse.groovy"
    script.write_text(GROOVY_PARSE)
    broken = tmp_path / "broken.nf"
    broken.write_text((NF / "main.nf").read_text()[:-3])
    env = {**os.environ, "JAVA_HOME": _java_home()}
    bad = subprocess.run(["groovy", str(script), str(broken)], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 1 and "expecting '}'" in bad.stderr, bad.stderr  # the check can fail
    proc = subprocess.run(["groovy", str(script), *map(str, NF_FILES)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- rendering the scripts ---

class Meta(dict):
    __getattr__ = dict.__getitem__


class Staged(list):
    """A list of staged paths, rendered as Nextflow renders a path list in a script: space-separated."""

    def __str__(self) -> str:
        return " ".join(map(str, self))


def groovy_to_python(expr: str) -> str:
    """The few Groovy expression forms the modules use (GStrings, `a ?: b`, `c ? a : b`, attribute access)
    as Python; anything else is refused, so a new construct in a module shows up here first."""
    expr = expr.strip()
    m = re.fullmatch(r"(.+?) \?: (.+)", expr)
    if m:
        return f"(({groovy_to_python(m.group(1))}) or ({groovy_to_python(m.group(2))}))"
    m = re.fullmatch(r"(.+?) \? (.+?) : (.+)", expr)
    if m:
        cond, a, b = (groovy_to_python(g) for g in m.groups())
        return f"(({a}) if ({cond}) else ({b}))"
    if re.fullmatch(r'"(?:[^"\\$]|\$\{[\w.]+\})*"', expr):
        return "f" + expr.replace("${", "{")
    if re.fullmatch(r"''|'[^'\\]*'|\d+|[A-Za-z_][\w.]*|[A-Za-z_][\w.]* [<>]=? \d+", expr):
        return expr
    raise AssertionError(f"Groovy expression not understood by the test: {expr}")


def render(section: str, scope: dict) -> tuple[str, dict]:
    """What Nextflow runs for a `script:`/`stub:` section: its assignments evaluated, then the triple-quoted
    GString with ${...} substituted, backslash escapes applied and the common indentation stripped."""
    head, sep, rest = section.partition('"""')
    assert sep, "the section must end in a triple-quoted script"
    body, sep, tail = rest.partition('"""')
    assert sep and not tail.strip(), "nothing may follow the script string"
    scope = dict(scope)
    for line in head.strip().splitlines():
        m = re.fullmatch(r"\s*(?:def )?(\w+) = (.+)", line)
        assert m, f"unexpected line before the script: {line!r}"
        scope[m.group(1)] = eval(groovy_to_python(m.group(2)), {}, scope)  # the module's own text, translated

    def sub(m: re.Match) -> str:
        return str(eval(groovy_to_python(m.group(1)), {}, scope))

    text = re.sub(r"(?<!\\)\$\{([^}]+)\}", sub, body)
    text = text.replace("\\$", "$").replace("\\\\", "\\")
    return textwrap.dedent(text).strip("\n") + "\n", scope


def task(process: str, args: str, cpus: int = 1) -> SimpleNamespace:
    return SimpleNamespace(ext=SimpleNamespace(args=args, prefix=None, when=None), cpus=cpus, process=process)


def protsae_words(script: str) -> list[str]:
    """The protsae command of a rendered script (line continuations joined), as bash splits it."""
    command = script.split("\n\ncat <<-END_VERSIONS")[0].replace("\\\n", " ")
    words = shlex.split(command)
    assert words[0] == "protsae"
    return words


def help_options(command: str) -> set[str]:
    env = {**os.environ, "COLUMNS": "250", "TERM": "dumb", "NO_COLOR": "1"}
    out = subprocess.run([sys.executable, "-m", "protsae_cli", command, "--help"], capture_output=True, text=True,
                         env=env, timeout=120).stdout
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-zA-Z])\b", out))


ANNOTATE = sections(processes(MODULES["PROTSAE_ANNOTATE"] / "main.nf")["PROTSAE_ANNOTATE"])
MERGE = sections(processes(MODULES["PROTSAE_MERGE"] / "main.nf")["PROTSAE_MERGE"])


def test_rendered_command_lines_use_only_options_protsae_has():
    annotate_opts, merge_opts = help_options("annotate"), help_options("merge")
    assert {"--shard", "--formats", "-o"} <= annotate_opts  # the help was read
    cases = [  # (shard, n_shards, sae, model, ext.args)
        (2, 3, "my_sae", "esm2.pt", "--toks-per-batch 8 --device cpu"),
        (1, 1, [], [], ""),
    ]
    for shard, n, sae, model, args in cases:
        meta = Meta(id="in", shard=shard, n_shards=n)
        script, scope = render(ANNOTATE["script"], dict(meta=meta, fasta="in.fasta", sae=sae, model=model,
                                                        task=task("PROTSAE_ANNOTATE", args)))
        words = protsae_words(script)
        assert words[1] == "annotate" and words[2] == "in.fasta"
        assert {w.split("=")[0] for w in words if w.startswith("-")} <= annotate_opts, words
        assert words[words.index("-o") + 1] == scope["prefix"] == f"in.{shard}-of-{n}"
        assert ("--shard" in words) == (n > 1) and (n == 1 or words[words.index("--shard") + 1] == f"{shard}/{n}")
        assert ("--sae" in words) == bool(sae) and ("--model" in words) == bool(model)
        if model:
            assert words[words.index("--model") + 1] == f"./{model}"  # a path, never looked up as a name
        out_pattern = re.search(r'path\("\$\{prefix\}\.h5"\)', ANNOTATE["output"])
        assert out_pattern and "--formats" in words and words[words.index("--formats") + 1] == "h5"

    script, _ = render(MERGE["script"], dict(meta=Meta(id="in"), shards=Staged(["shards/a.h5", "shards/b.h5"]),
                                             task=task("PROTSAE_MERGE", "--formats h5,tsv")))
    words = protsae_words(script)
    assert words[:5] == ["protsae", "merge", "in", "shards/a.h5", "shards/b.h5"]
    assert {w for w in words if w.startswith("-")} <= merge_opts, words


def test_groovy_translation_refuses_what_it_does_not_know():
    with pytest.raises(AssertionError, match="not understood"):
        groovy_to_python("files.collect { it.name }.join(' ')")
    assert eval(groovy_to_python("n > 1 ? \"--shard ${i}/${n}\" : ''"), {}, {"n": 3, "i": 2}) == "--shard 2/3"
    assert eval(groovy_to_python("task.ext.args ?: ''"), {}, {"task": task("X", None)}) == ""


def _stage(workdir: Path, links: dict[str, Path]) -> None:
    """A task directory as Nextflow stages it: inputs as symlinks under their names."""
    workdir.mkdir(parents=True)
    for name, target in links.items():
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).symlink_to(target)


def _run_task(workdir: Path, script: str, bindir: Path) -> None:
    (workdir / ".command.sh").write_text("#!/bin/bash -ue\n" + script)
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-ue", ".command.sh"], cwd=workdir, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, f"{workdir.name}: exit {proc.returncode}\n{script}\n{proc.stderr[-3000:]}"


def _protsae_shim(tmp_path: Path) -> Path:
    """`protsae` on PATH as this interpreter's package, as the container or conda environment provides it."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "protsae"
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m protsae_cli \"$@\"\n")
    shim.chmod(0o755)
    return bindir


def test_module_scripts_shard_annotate_and_merge_equal_a_direct_run(tiny_esm_path, tiny_sae_dir, tmp_path):
    """The workflow's channel logic by hand (one task per shard with meta.shard/n_shards, then all shards to
    one merge) and the modules' rendered scripts run in staged task directories: merged output equals one
    direct run (--toks-per-batch 1, one thread: the same batches and reduction order) and versions.yml names
    the process and protsae's version."""
    fasta = write_fasta(tmp_path / "in.fasta", n=12)
    bindir = _protsae_shim(tmp_path)
    n = 3
    shards = []
    for i in range(1, n + 1):
        meta = Meta(id="in", shard=i, n_shards=n)
        work = tmp_path / "work" / f"annotate_{i}"
        _stage(work, {"in.fasta": fasta, tiny_sae_dir.name: tiny_sae_dir, tiny_esm_path.name: tiny_esm_path})
        script, scope = render(ANNOTATE["script"], dict(
            meta=meta, fasta="in.fasta", sae=tiny_sae_dir.name, model=tiny_esm_path.name,
            task=task("PROTSAE_ANNOTATE", "--device cpu --toks-per-batch 1 --skip-invalid")))
        _run_task(work, script, bindir)
        out = work / f"{scope['prefix']}.h5"
        assert out.is_file(), sorted(p.name for p in work.iterdir())
        versions = yaml.safe_load((work / "versions.yml").read_text())
        assert versions == {"PROTSAE_ANNOTATE": {"protsae": protsae_cli.__version__}}
        shards.append(out)

    work = tmp_path / "work" / "merge"
    _stage(work, {f"shards/{p.name}": p for p in shards})
    script, _ = render(MERGE["script"], dict(meta=Meta(id="in"), shards=Staged(f"shards/{p.name}" for p in shards),
                                             task=task("PROTSAE_MERGE", "--formats h5,tsv,gff3")))
    _run_task(work, script, bindir)
    assert yaml.safe_load((work / "versions.yml").read_text()) == {"PROTSAE_MERGE": {"protsae": protsae_cli.__version__}}

    old_threads = torch.get_num_threads()
    try:
        ann = Annotator(str(tiny_esm_path), str(tiny_sae_dir), device="cpu", threads=1)
        ann.run(AnnotateOptions(input=str(fasta), output_prefix=str(tmp_path / "direct"), device="cpu",
                                toks_per_batch=1, skip_invalid=True, progress=False, threads=1))
    finally:
        torch.set_num_threads(old_threads)
    assert_same_outputs(work / "in", tmp_path / "direct")


def test_stub_blocks_create_every_declared_output(tmp_path):
    bindir = _protsae_shim(tmp_path)
    for name, sec, scope in [
        ("PROTSAE_ANNOTATE", ANNOTATE, dict(meta=Meta(id="x", shard=1, n_shards=2), task=task("PROTSAE_ANNOTATE", ""))),
        ("PROTSAE_MERGE", MERGE, dict(meta=Meta(id="x"), task=task("PROTSAE_MERGE", ""))),
    ]:
        work = tmp_path / name
        work.mkdir()
        script, rendered = render(sec["stub"], scope)
        _run_task(work, script, bindir)
        for pattern in re.findall(r'path\("([^"]+)"\)', sec["output"]):
            expected = re.sub(r"\$\{(\w+)\}", lambda m, values=rendered: str(values[m.group(1)]), pattern)
            assert (work / expected).is_file(), f"{name}: stub does not create {expected}"
        assert yaml.safe_load((work / "versions.yml").read_text()) == {name: {"protsae": protsae_cli.__version__}}


@pytest.mark.skipif(shutil.which("nextflow") is None, reason="nextflow is not installed (not on the registries here)")
def test_nextflow_stub_run(tmp_path):
    proc = subprocess.run(["nextflow", "run", str(NF), "-profile", "test", "-stub", "--outdir", str(tmp_path / "out")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"proteins.h5", "proteins.tsv", "proteins.gff3"}
