"""workflow/Snakefile run for real with the local profile on 2 cores: shards, merge, equality with a direct run."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from protsae_cli.annotate.pipeline import AnnotateOptions, Annotator
from tests.annotate.test_merge_resume import assert_same_outputs, write_fasta

WORKFLOW = Path(__file__).resolve().parents[1] / "workflow"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("snakemake") is None,
                                reason="snakemake is not installed (pip install -e '.[test]')")


def test_profiles_and_config_parse():
    yaml = pytest.importorskip("yaml")  # a snakemake dependency
    config = yaml.safe_load((WORKFLOW / "config.yaml").read_text())
    assert {"input", "outdir", "prefix", "n_shards", "annotate_args", "threads", "gpus_per_job"} <= set(config)
    local = yaml.safe_load((WORKFLOW / "profiles/local/config.yaml").read_text())
    assert local["resources"]["gpu"] >= 1
    slurm = yaml.safe_load((WORKFLOW / "profiles/slurm/config.yaml").read_text())
    assert slurm["executor"] == "slurm" and "protsae_annotate" in slurm["set-resources"]
    snakefile = (WORKFLOW / "Snakefile").read_text()
    assert "gpu=" in snakefile and "--shard {params.shard:q}" in snakefile and "{params.protsae} merge" in snakefile


def test_every_job_rule_has_the_conda_environment_and_the_container():
    """--sdm conda and --sdm apptainer reach every rule that runs protsae (rule `all` runs nothing)."""
    yaml = pytest.importorskip("yaml")
    snakefile = (WORKFLOW / "Snakefile").read_text()
    env_path = re.search(r'^CONDA_ENV = "([^"]+)"$', snakefile, re.M).group(1)
    env = yaml.safe_load((WORKFLOW / env_path).read_text())  # relative to the Snakefile, as Snakemake reads it
    assert any(str(d).startswith("protsae ") for d in env["dependencies"])
    rules = dict(re.findall(r"^rule (\w+):\n((?:[ \t]+.*\n|\n)*)", snakefile, re.M))
    assert set(rules) == {"all", "protsae_annotate", "protsae_merge"}
    for name in ("protsae_annotate", "protsae_merge"):
        assert re.search(r"^    conda: CONDA_ENV$", rules[name], re.M), name
        assert re.search(r"^    container: CONTAINER$", rules[name], re.M), name


def _snakemake(tmp_path: Path, *extra: str, config: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(WORKFLOW / "Snakefile"), "--cores", "1",
           "--directory", str(tmp_path), *extra, "--config", *(f"{k}={v}" for k, v in config.items())]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


INJECTION = {"annotate_args": "--toks-per-batch 8; touch PWNED", "protsae": "true x$(touch PWNED2)",
             "prefix": "my run;touch PWNED3", "n_shards": "1", "formats": "h5"}


def test_config_values_cannot_split_or_inject_shell_commands(tmp_path):
    """Config values reach the jobs' shell commands quoted: a `;` or `$(...)` stays text inside one argument."""
    (tmp_path / "in.fasta").write_text(">a\nMKV\n")
    proc = _snakemake(tmp_path, "-n", "-p", config={"input": "in.fasta", "outdir": "out dir", **INJECTION})
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout + proc.stderr
    lines = [line.split("Shell command:")[-1].strip() for line in printed.splitlines()
             if " annotate " in line and "--shard" in line]
    assert lines, printed[-3000:]
    # Read as bash would (up to the log redirection): shell operators come out as tokens of their own.
    lexer = shlex.shlex(lines[0].split(" 2> ")[0], posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = list(lexer)
    assert not [w for w in words if set(w) <= set(";&|()<>")], words  # no unquoted operator: one command
    assert words[:4] == ["true", "x$(touch", "PWNED2)", "annotate"]  # split into words, not substituted
    assert words[words.index("-o") + 1] == "out dir/shards/my run;touch PWNED3.1-of-1"
    assert words[-3:] == ["8;", "touch", "PWNED"]  # arguments of protsae, not a second command

    # And for real (the "protsae" command is `true`, so the job runs in milliseconds and writes nothing): no
    # injected command ran.
    proc = _snakemake(tmp_path, "--latency-wait", "0", "--retries", "0",
                      config={"input": "in.fasta", "outdir": "out", **INJECTION})
    assert proc.returncode != 0  # `true` writes no h5, so the job's output is missing
    log = proc.stdout + proc.stderr
    assert "MissingOutputException" in log or "Missing files after" in log, log[-3000:]
    assert not list(tmp_path.rglob("PWNED*")), sorted(map(str, tmp_path.rglob("PWNED*")))


def test_bad_formats_are_refused_before_any_job(tmp_path):
    (tmp_path / "in.fasta").write_text(">a\nMKV\n")
    proc = _snakemake(tmp_path, "-n", config={"input": "in.fasta", "formats": "h5;touch PWNED"})
    assert proc.returncode != 0
    assert "formats must be a comma-separated subset of h5,tsv,gff3" in proc.stdout + proc.stderr


def test_workflow_runs_locally_and_equals_a_direct_run(tiny_esm_path, tiny_sae_dir, tmp_path):
    fasta = write_fasta(tmp_path / "in.fasta", n=16)
    annotate_args = f"--model {shlex.quote(str(tiny_esm_path))} --sae {shlex.quote(str(tiny_sae_dir))} " \
                    "--device cpu --toks-per-batch 1 --skip-invalid"
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "snakemake", "-s", str(WORKFLOW / "Snakefile"),
           "--profile", str(WORKFLOW / "profiles/local"), "--cores", "2", "--resources", "gpu=2",
           "--directory", str(tmp_path), "--retries", "0",
           "--config", f"input={fasta}", f"outdir={out}", "prefix=run", "n_shards=3", "threads=1",
           f"annotate_args={annotate_args}", f"protsae={sys.executable} -m protsae_cli"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    logs = "".join(p.read_text() for p in sorted((out / "logs").glob("*.log"))) if (out / "logs").exists() else ""
    assert proc.returncode == 0, proc.stderr[-4000:] + logs

    assert sorted(p.name for p in (out / "shards").glob("*.h5")) == [f"run.{i}-of-3.h5" for i in (1, 2, 3)]
    assert "INFO protsae.merge: merged 3 files" in (out / "logs/merge.log").read_text()  # logs went to {log}

    # The same settings in one process; --threads 1 as in the jobs, so float reductions run in the same order.
    old_threads = torch.get_num_threads()
    try:
        ann = Annotator(str(tiny_esm_path), str(tiny_sae_dir), device="cpu", threads=1)
        ann.run(AnnotateOptions(input=str(fasta), output_prefix=str(tmp_path / "direct"), device="cpu",
                                toks_per_batch=1, skip_invalid=True, progress=False, threads=1))
    finally:
        torch.set_num_threads(old_threads)
    assert_same_outputs(out / "run", tmp_path / "direct")
