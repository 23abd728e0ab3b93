"""Every enumerated or ranged option of every command is checked while Click parses the command line: exit 2,
the bad value and the choices named, before any library module (and so any model) is loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from protsae_cli.cli import options
from protsae_cli.cli.app import build_app

ROOT = Path(__file__).resolve().parents[2]

# Required arguments of each command (dummy paths: nothing is opened when parsing fails).
BASE = {
    "annotate": ["annotate", "in.fasta"],
    "merge": ["merge", "out", "a.h5"],
    "train": ["train", "in.fasta", "-o", "sae_out"],
    "eval": ["eval", "in.fasta", "--sae", "sae", "--json", "e.json"],
    "steer": ["steer", "-c", "tm", "-o", "o.fasta"],
    "report": ["report", "x.h5"],
    "export-structure": ["export-structure", "--h5", "x.h5", "--pdb", "x.pdb", "-o", "o.pdb", "-c", "c"],
    "export-onnx": ["export-onnx", "--sae", "sae", "-o", "o.onnx"],
}

# (command, option, bad value, words the error must contain)
ENUM_CASES = [
    ("annotate", "--h5-dtype", "float8", ["float8", "float16", "float32"]),
    ("annotate", "--formats", "h5,foo", ["'foo'", "h5, tsv, gff3"]),
    ("annotate", "--formats", ",", ["at least one of h5, tsv, gff3"]),
    ("annotate", "--backend", "cuda", ["cuda", "auto", "torch", "triton", "onnx"]),
    ("annotate", "--long-policy", "split", ["split", "window", "truncate", "error"]),
    ("annotate", "--device", "gpu", ["use cuda"]),
    ("annotate", "--device", "tpu", ["'tpu'", "auto, cpu, cuda or cuda:N"]),
    ("annotate", "--devices", "0,gpu1", ["'gpu1'", "cuda:N or cpu"]),
    ("annotate", "--devices", "0,,1", ["empty item"]),
    ("merge", "--formats", "h5,gff", ["'gff'", "h5, tsv, gff3"]),
    ("merge", "--compression", "zstd", ["zstd", "gzip", "lzf", "none"]),
    ("train", "--hook", "mlp_out", ["mlp_out", "resid_post", "attn_out"]),
    ("train", "--arch", "vae", ["vae", "topk", "protsae"]),
    ("train", "--annotation-format", "xml", ["xml", "uniprot-xml", "generic-tsv", "auto"]),
    ("train", "--label-granularity", "token", ["token", "residue", "protein"]),
    ("train", "--pool", "sum", ["sum", "mean", "max"]),
    ("train", "--topk-scope", "some", ["some", "defined_first", "unknown"]),
    ("train", "--defined-bias", "zero", ["zero", "calibrated", "pred"]),
    ("train", "--bias-ref", "median", ["median", "active_mean", "kth_value"]),
    ("train", "--lr-schedule", "linear", ["linear", "cosine", "multistep", "constant"]),
    ("train", "--device", "gpu:1", ["use cuda:1"]),
    ("eval", "--annotation-format", "fasta", ["fasta", "tmbed", "binding"]),
    ("eval", "--device", "cuda:x", ["'cuda:x'", "auto, cpu, cuda or cuda:N"]),
    ("steer", "--init", "zeros", ["zeros", "mask", "random"]),
    ("steer", "--mode", "set", ["set", "add", "clamp", "multiply"]),
    ("steer", "--edit-scope", "some", ["some", "all", "designed"]),
    ("steer", "--positions", "none", ["none", "masked", "all"]),
    ("steer", "--mask-strategy", "high", ["high", "random", "low-activation"]),
    ("steer", "--decode", "beam", ["beam", "argmax", "iterative", "gibbs", "sample"]),
    ("steer", "--control", "random-latent,random", ["'random'", "random-latent, activity-matched"]),
    ("steer", "--pppl-positions", "masked", ["masked", "all", "designed"]),
    ("steer", "--device", "GPU", ["use cuda"]),
    ("export-structure", "--scale", "log", ["log", "max", "raw"]),
]

# (command, option, out-of-range value)
RANGE_CASES = [
    ("annotate", "--toks-per-batch", "0"), ("annotate", "--window-overlap", "-1"), ("annotate", "--threads", "0"),
    ("annotate", "--min-segment-len", "0"), ("annotate", "--merge-gap", "-1"),
    ("train", "--k", "0"), ("train", "--d-sae", "0"), ("train", "--layer", "0"), ("train", "--epochs", "0"),
    ("train", "--batch-size", "0"), ("train", "--val-fraction", "1"), ("train", "--val-fraction", "-0.1"),
    ("train", "--save-after", "1.5"), ("train", "--lr", "0"), ("train", "--max-steps", "0"),
    ("train", "--tokens-per-protein", "-1"), ("train", "--shuffle-buffer", "0"), ("train", "--state-every", "0"),
    ("eval", "--valid-fraction", "1"), ("eval", "--valid-fraction", "0"), ("eval", "--mask-fraction", "2"),
    ("eval", "--lm-proteins", "-1"), ("eval", "--toks-per-batch", "0"), ("eval", "--max-residues", "0"),
    ("steer", "--mask-ratio", "0"), ("steer", "--mask-ratio", "1.1"), ("steer", "--iterations", "0"),
    ("steer", "--temperature", "0"), ("steer", "--n-controls", "0"), ("steer", "--length", "0"),
    ("steer", "--length", "2000"), ("steer", "--num", "0"), ("steer", "--threads", "0"),
    ("steer", "--pppl-max-positions", "-1"),  # 0 = all positions (#16.5)
    ("report", "--max-proteins", "-1"), ("report", "--top-latents", "-1"), ("report", "--max-lanes", "-1"),
    ("report", "--scan-entries", "-1"), ("report", "--table-limit", "-1"),
    ("export-structure", "--min-identity", "1.5"), ("export-structure", "--index", "-1"),
    ("export-onnx", "--opset", "10"),
]


@pytest.fixture(scope="module")
def app():
    return build_app()


def _invoke(app, args: list[str]):
    return CliRunner().invoke(app, args, env={"COLUMNS": "200"})


def _flat(output: str) -> str:
    """The output with rich's box drawing removed and whitespace collapsed, so wrapped messages read whole."""
    return " ".join(output.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


@pytest.mark.parametrize("command,option,value,words", ENUM_CASES,
                         ids=[f"{c}{o}={v}" for c, o, v, _ in ENUM_CASES])
def test_bad_choice_exits_2_naming_value_and_choices(app, command, option, value, words):
    res = _invoke(app, [*BASE[command], option, value])
    text = _flat(res.output)
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert option in text
    for w in words:
        assert w in text, f"{w!r} missing from: {text}"


@pytest.mark.parametrize("command,option,value", RANGE_CASES, ids=[f"{c}{o}={v}" for c, o, v in RANGE_CASES])
def test_out_of_range_number_exits_2(app, command, option, value):
    res = _invoke(app, [*BASE[command], option, value])
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert option in _flat(res.output)


def test_rejected_before_any_library_module_is_imported():
    """All the bad values again, in a fresh interpreter: no command body ran, so no model (nor torch) was
    loaded. Every command body imports its library module, so the set of protsae modules proves it."""
    cases = [[*BASE[c], o, v] for c, o, v, _ in ENUM_CASES] + [[*BASE[c], o, v] for c, o, v in RANGE_CASES]
    script = (
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "from protsae_cli.cli.app import build_app\n"
        "app = build_app()\n"
        "codes = [CliRunner().invoke(app, a).exit_code for a in json.load(sys.stdin)]\n"
        "mods = sorted(m for m in sys.modules\n"
        "              if m.startswith('protsae_cli.') and not m.startswith('protsae_cli.cli'))\n"
        "print(json.dumps({'codes': codes, 'modules': mods, 'torch': 'torch' in sys.modules or 'numpy' in sys.modules}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], input=json.dumps(cases), capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["codes"] == [2] * len(cases)
    # Only declarations: runtime (exit codes), and the options dataclasses the CLI reads its defaults from
    # (with the packages they sit in); none of them imports torch or numpy.
    declarations = {"protsae_cli.logging_setup", "protsae_cli.errors", "protsae_cli.runtime", "protsae_cli.io.fasta",
                    "protsae_cli.io.writers", "protsae_cli.sae.config", "protsae_cli.annotate.options",
                    "protsae_cli.evaluate.options", "protsae_cli.train.options", "protsae_cli.steer.options"}
    packages = {m.rsplit(".", 1)[0] for m in declarations}
    assert set(out["modules"]) <= declarations | packages, out["modules"]
    assert not out["torch"]


def test_gpu_hint_and_formats_message_from_the_console_script(tmp_path):
    """The real entry point (python -m protsae_cli), as a user sees it: exit 2, message on stderr."""
    proc = subprocess.run([sys.executable, "-m", "protsae_cli", "annotate", str(ROOT / "examples/proteins.fasta"),
                           "-o", str(tmp_path / "o"), "--device", "gpu", "--h5-dtype", "float8"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in err and "INFO" not in err
    assert ("use cuda" in err) or ("float16" in err and "float32" in err)
    assert not list(tmp_path.iterdir())


def test_enums_match_the_library_choices():
    """The CLI's lists and the library's checks must accept exactly the same words."""
    from protsae_cli.steer import pipeline as steer
    from protsae_cli.labels import formats as annotation_sources
    from protsae_cli.plm import batching, esm_forward
    from protsae_cli.report import structure
    from protsae_cli.train import pipeline as train
    from protsae_cli.train import trainer
    from protsae_cli.encode import BACKENDS
    from protsae_cli.sae.protsae import _CHOICES

    v = options.values
    assert set(v(options.Backend)) == set(BACKENDS)
    assert set(v(options.LongPolicy)) == set(batching.LONG_POLICIES)
    assert set(v(options.HookPoint)) == set(esm_forward.HOOK_POINTS)
    assert set(v(options.Arch)) == set(train.ARCHS)
    assert set(v(options.LrSchedule)) == set(trainer.LR_SCHEDULES)
    assert set(v(options.AnnotationFormat)) == {"auto", *annotation_sources.FORMATS}
    assert set(v(options.LabelGranularity)) == set(_CHOICES["label_granularity"])
    assert set(v(options.Pool)) == set(_CHOICES["pool"])
    assert set(v(options.BiasRef)) == set(_CHOICES["bias_ref"])
    assert set(v(options.TopkScope)) == {"auto", *_CHOICES["topk_scope"]}
    assert set(v(options.DefinedBias)) == {"auto", *_CHOICES["defined_bias"]}
    assert set(v(options.SteerMode)) == set(steer.MODES)
    assert set(v(options.Decode)) == set(steer.DECODES)
    assert set(v(options.MaskStrategy)) == set(steer.MASK_STRATEGIES)
    assert set(v(options.Positions)) == set(steer.POSITIONS)
    assert set(v(options.EditScope)) == set(steer.EDIT_SCOPES)
    assert set(v(options.Control)) == set(steer.CONTROLS)
    assert set(v(options.SteerInit)) == set(steer.INITS)
    assert set(v(options.PpplPositions)) == set(steer.PPPL_POSITIONS)
    assert set(v(options.StructureScale)) == set(structure.SCALES)


@pytest.mark.parametrize("command", list(BASE))
def test_help_renders_with_defaults(app, command):
    res = _invoke(app, [command, "--help"])
    assert res.exit_code == 0, res.output
    text = _flat(res.output)
    assert "[default:" in text
    expected = {"annotate": ["float32", "h5,tsv,gff3", "window", "16384"], "merge": ["gzip"],
                "train": ["resid_post", "topk", "cosine", "active_mean"], "eval": ["8192", "0.5"],
                "steer": ["argmax", "masked", "mask"], "report": ["50"], "export-structure": ["max", "0.9"],
                "export-onnx": ["17"]}[command]
    for word in expected:
        assert f"default: {word}" in text, f"default {word} not shown in {command} --help"
    if command in ("annotate", "steer", "train", "eval"):
        assert "default: auto" in text  # --device


def test_valid_values_still_run(tmp_path, tiny_esm_path, tiny_sae_dir):
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">A\nMKTAYIAKQRQISFVKSHFSRQ\n>B\nMLEERLGLIEVQ\n")
    res = CliRunner().invoke(build_app(), [
        "annotate", str(fasta), "--model", str(tiny_esm_path), "--sae", str(tiny_sae_dir), "-o",
        str(tmp_path / "run"), "--formats", " tsv ", "--backend", "torch", "--device", "cpu", "--h5-dtype",
        "float32", "--long-policy", "truncate", "--no-progress"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert (tmp_path / "run.tsv").read_text().startswith("#")
    assert not (tmp_path / "run.h5").exists()
