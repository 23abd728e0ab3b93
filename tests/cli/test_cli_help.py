"""`protsae ... --help` reads like the tools users know (no Python types), -v/-q work after the subcommand too,
and shell completion is on."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from protsae_cli.cli.app import COMMANDS, build_app
from protsae_cli.logging_setup import current_level

ROOT = Path(__file__).resolve().parents[2]

# What Typer prints for a Python type; none of it may reach a user's screen.
PYTHON_TYPES = re.compile(r"<(?:bool|int|float|str|path|file|dir|int range|float range)>|<[\w.-]+(?:\|[\w.-]+)+>"
                          r"|\blist\[|\btuple\[|\{[A-Za-z_]+(?:\.\.\.)?\}")

# Usage line of each command: its positional arguments by their metavar, required ones bare.
USAGE = {
    "annotate": "protsae annotate [OPTIONS] FASTA",
    "train": "protsae train [OPTIONS] FASTA",
    "eval": "protsae eval [OPTIONS] FASTA",
    "merge": "protsae merge [OPTIONS] PREFIX SHARD...",
    "report": "protsae report [OPTIONS] H5",
    "steer": "protsae steer [OPTIONS]",
    "export-structure": "protsae export-structure [OPTIONS] [H5]",
    "export-onnx": "protsae export-onnx [OPTIONS]",
    "calibrate": "protsae calibrate [OPTIONS] FASTA",
    "label": "protsae label [OPTIONS] FASTA",
    "models": "protsae models [OPTIONS]",
}

# (command, option, the value column it must show): metavars in the conventional words.
METAVARS = [
    ("annotate", "--output", "PREFIX"), ("annotate", "--toks-per-batch", "INT"), ("annotate", "--sae", "DIR"),
    ("annotate", "--model", "NAME|PATH"), ("annotate", "--h5-dtype", "[float16|float32]"),
    ("annotate", "--backend", "[auto|torch|triton|onnx]"), ("annotate", "--device", "DEVICE"),
    ("merge", "--compression", "[gzip|lzf|none]"), ("train", "--lr", "FLOAT"), ("train", "--annotations", "PATH"),
    ("export-structure", "--min-identity", "FLOAT"), ("export-structure", "--h5", "H5"),
    ("export-onnx", "--opset", "INT"), ("report", "--png-dir", "PATH"), ("steer", "--decode", None),
    ("train", "--output", "DIR"), ("train", "--activation-cache", "DIR"), ("eval", "--sae", "DIR"),
    ("eval", "--json", "PATH"), ("steer", "--input", "FASTA"), ("steer", "--strength", "LIST"),
]

# Flags: nothing may follow the option name.
FLAGS = [("annotate", "--resume"), ("annotate", "--skip-invalid"), ("merge", "--renumber"),
         ("export-structure", "--force"), ("train", "--no-axiom"), ("annotate", "--verbose"), ("", "--version"),
         ("", "--quiet")]


@pytest.fixture(scope="module")
def app():
    return build_app()


def _help(app, command: str) -> str:
    res = CliRunner().invoke(app, [*([command] if command else []), "--help"], env={"COLUMNS": "220"})
    assert res.exit_code == 0, res.output
    return res.output


def _rows(text: str) -> dict[str, str]:
    """Help table rows by their long option: what follows the option's names (the value column, then the
    help), box drawing and the required-marker removed."""
    rows: dict[str, str] = {}
    for line in text.splitlines():
        cells = line.strip("│ ").split()
        if cells[:1] == ["*"]:
            cells = cells[1:]
        if not cells or not cells[0].startswith("--") or cells[0] in rows:
            continue
        rest = cells[1:]
        while rest and rest[0].startswith("-"):  # the short name, --no-... of a boolean pair
            rest = rest[1:]
        rows[cells[0]] = " ".join(rest)
    return rows


@pytest.mark.parametrize("command", ["", *(name for name, _ in COMMANDS)])
def test_help_has_no_python_types(app, command):
    text = _help(app, command)
    bad = PYTHON_TYPES.findall(text)
    assert not bad, f"`protsae {command} --help` shows Python types {bad}:\n{text}"
    if command:
        assert f"Usage: {USAGE[command]}" in " ".join(text.split())


def test_every_command_is_in_the_usage_table():
    assert set(USAGE) == {name for name, _ in COMMANDS}


@pytest.mark.parametrize("command,option,metavar", METAVARS, ids=[f"{c}{o}" for c, o, _ in METAVARS])
def test_option_metavars(app, command, option, metavar):
    row = _rows(_help(app, command))[option]
    if metavar is None:  # a choice list: its words, between brackets
        assert row.startswith("[") and "|" in row.split()[0], row
    else:
        assert row.split()[0] == metavar, row


@pytest.mark.parametrize("command,flag", FLAGS, ids=[f"{c}{f}" for c, f in FLAGS])
def test_flags_show_no_value(app, command, flag):
    row = _rows(_help(app, command))[flag]
    first = row.split()[0]
    assert not re.fullmatch(r"[A-Z][A-Z_|./]+|[<\[{].*", first), f"{flag} shows a value: {row}"


def test_wide_choice_lists_move_into_the_help_text(app):
    row = " ".join(_help(app, "train").translate({ord(c): " " for c in "│╭╮╰╯─"}).split())
    assert "--annotation-format FORMAT" in row
    assert "Choices: auto, swissprot, uniprot-xml, uniprot-tsv, tmbed, binding, gaf, go-tsv, generic-tsv." in row


# -- -v / -q / --log-file before and after the subcommand ---------------------------------------------------

def _level_after(app, args: list[str]) -> int:
    """The console log level a command ran with. `report` of a missing file fails in its body, after the
    logging options were applied, without loading anything heavy."""
    res = CliRunner().invoke(app, args)
    assert res.exit_code != 2, res.output  # parsed: -v/-q were accepted where they stand
    return current_level()


@pytest.mark.parametrize("args,level", [
    (["report", "missing.h5"], logging.INFO),
    (["report", "missing.h5", "-v"], logging.DEBUG),
    (["report", "missing.h5", "-q"], logging.WARNING),
    (["report", "-q", "missing.h5"], logging.WARNING),
    (["-q", "report", "missing.h5"], logging.WARNING),
    (["-q", "report", "missing.h5", "-q"], logging.ERROR),  # the two places add up: -qq
    (["report", "missing.h5", "-qq"], logging.ERROR),
    (["-v", "report", "missing.h5", "--verbose"], logging.DEBUG),
])
def test_verbosity_before_and_after_the_subcommand(app, args, level):
    assert _level_after(app, args) == level


def test_a_number_after_v_is_a_usage_error_that_says_repeat_the_flag(app):
    for args in (["-v", "2"], ["report", "x.h5", "-v", "2"]):
        res = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
        assert res.exit_code == 2
        assert "repeat them instead (-vv, -qq)" in " ".join(res.output.split())


def test_log_file_after_the_subcommand(tiny_esm_path, tiny_sae_dir, tmp_path):
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">A\nMKTAYIAKQRQISFVKSHFSRQ\n")
    log = tmp_path / "run.log"
    res = CliRunner().invoke(build_app(), [
        "annotate", str(fasta), "--model", str(tiny_esm_path), "--sae", str(tiny_sae_dir), "--device", "cpu",
        "-o", str(tmp_path / "run"), "--formats", "tsv", "--no-progress", "-q", "--log-file", str(log)])
    assert res.exit_code == 0, (res.output, res.exception)
    assert "annotated 1 proteins" in log.read_text()
    assert current_level() == logging.WARNING


# -- shell completion ---------------------------------------------------------------------------------------

def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "protsae_cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=ROOT, timeout=60)


def _orphaned(*args: str) -> tuple[int, str, str]:
    """Run protsae with no shell among its parents (double fork: its parent is init or a subreaper), as in a
    container's entrypoint or a scheduler's job, where shell detection fails. Returns (exit code, out, err)."""
    import json as _json

    code = ("import json, os, subprocess, sys\n"
            "r, w = os.pipe()\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            "        os.close(r)\n"
            "        import time; time.sleep(0.5)  # the middle process is gone: reparented\n"
            f"        p = subprocess.run([sys.executable, '-m', 'protsae_cli', *{list(args)!r}], capture_output=True, "
            "text=True)\n"
            "        os.write(w, json.dumps([p.returncode, p.stdout, p.stderr]).encode())\n"
            "        os._exit(0)\n"
            "    os._exit(0)\n"
            "os.close(w)\n"
            "data = b''\n"
            "while chunk := os.read(r, 65536):\n"
            "    data += chunk\n"
            "sys.stdout.write(data.decode())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION"})
    rc, out, err = _json.loads(proc.stdout)
    return rc, out, err


def test_completion_script_for_a_named_shell_needs_no_shell_detection():
    # `protsae --show-completion zsh` gives zsh's script whatever shell runs it, also with no shell above it.
    rc, out, err = _orphaned("--show-completion", "zsh")
    assert rc == 0 and out.startswith("#compdef protsae"), (rc, out[:200], err)
    rc, out, err = _orphaned("--show-completion", "bash")
    assert rc == 0 and "_PROTSAE_COMPLETE=complete_bash" in out, (rc, out[:200], err)
    rc, out, err = _orphaned("--show-completion")
    if rc != 0:   # nothing to detect: a message that says how to name it, not Typer's "Shell  not supported."
        assert rc == 2 and "cannot detect the shell" in err and "--show-completion bash|zsh" in err, (rc, err)
    proc = _run({}, "--show-completion", "tcsh")
    assert proc.returncode == 2 and "unknown shell 'tcsh'" in proc.stderr, proc.stderr
    # After root options, with '=', in any case: still the named shell.
    rc, out, err = _orphaned("-q", "--log-file", os.devnull, "--show-completion=ZSH")
    assert rc == 0 and out.startswith("#compdef protsae"), (rc, out[:200], err)
    # Detected, but a shell without a completion script (a container's /bin/sh): say so and how to name one.
    proc = subprocess.run(["sh", "-c", f"'{sys.executable}' -m protsae_cli --show-completion"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    if proc.returncode != 0:
        assert proc.returncode == 2 and ("no completion script" in proc.stderr or "cannot detect" in proc.stderr), \
            proc.stderr


def test_undetectable_shell_is_a_usage_error(monkeypatch):
    import shellingham

    from protsae_cli.cli.app import completion_shell_named

    def fail():
        raise shellingham.ShellDetectionFailure()

    monkeypatch.setattr(shellingham, "detect_shell", fail)
    args, msg, named = completion_shell_named(["--install-completion"])
    assert not named
    assert msg and "cannot detect the shell" in msg and "protsae --install-completion bash|" in msg
    assert completion_shell_named(["annotate", "x.fa", "--show-completion"]) == (
        ["annotate", "x.fa", "--show-completion"], None, False)    # a command's arguments are left to it
    assert completion_shell_named(["-q", "--show-completion=ZSH"]) == (["-q", "--show-completion", "zsh"], None, True)
    monkeypatch.setattr(shellingham, "detect_shell", lambda: ("dash", "/bin/dash"))
    assert "'dash', which has no completion script" in completion_shell_named(["--show-completion"])[1]


def test_completion_script_and_completions():
    # The script `--install-completion` would install (for bash; the shell is named, not detected).
    proc = _run({}, "--show-completion", "bash")
    assert proc.returncode == 0, proc.stderr
    assert "_PROTSAE_COMPLETE=complete_bash" in proc.stdout and "complete -o default" in proc.stdout
    # What the shell gets back on TAB: command names, then a choice option's values.
    proc = _run({"_PROTSAE_COMPLETE": "complete_bash", "COMP_WORDS": "protsae ann", "COMP_CWORD": "1"})
    assert proc.returncode == 0 and proc.stdout.split() == ["annotate"], (proc.stdout, proc.stderr)
    proc = _run({"_PROTSAE_COMPLETE": "complete_bash", "COMP_WORDS": "protsae annotate x.fa --h5-dtype ",
                 "COMP_CWORD": "4"})
    assert proc.stdout.split() == ["float16", "float32"], (proc.stdout, proc.stderr)


def test_metavar_words_without_typer_type_records():
    """Typer releases before 0.29 keep Click's parameter types instead of `type_descriptor`: same words."""
    from types import SimpleNamespace as NS

    from protsae_cli.cli.command import metavar_for

    def param(type_name: str, **kw):
        return NS(is_flag=False, count=False, name="x", help="", type=NS(name=type_name, **kw))

    assert metavar_for(param("integer range")) == "INT"
    assert metavar_for(param("float")) == "FLOAT"
    assert metavar_for(param("path")) == "PATH"
    assert metavar_for(param("text")) == "TEXT"
    assert metavar_for(param("choice", choices=("gzip", "lzf"))) == "[gzip|lzf]"
    assert metavar_for(param("uuid")) is None  # unknown: Typer's own display is kept
    assert metavar_for(NS(is_flag=True, count=False)) == ""
