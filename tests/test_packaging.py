"""Packaging files agree with each other and with pyproject.toml: LICENSE, CITATION.cff, the conda recipe, the
Snakemake conda environment, and extras that install where triton has no wheel (conda and Docker themselves
are not available on the team's machines; these checks are what can run here)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

import protsae_cli

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

yaml = pytest.importorskip("yaml")  # PyYAML comes with snakemake, part of the test extra

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]

# conda-forge names of PyPI distributions whose conda package is named differently.
CONDA_NAMES = {"torch": "pytorch", "matplotlib": "matplotlib-base"}


def test_license_is_mit_and_matches_the_metadata():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 the protsae developers" in text
    assert "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND" in text
    assert PROJECT["license"] == {"text": "MIT"}
    assert "License :: OSI Approved :: MIT License" in PROJECT["classifiers"]
    assert PROJECT["authors"] and all(a.get("name") for a in PROJECT["authors"])
    assert all(url.startswith("https://") for url in PROJECT["urls"].values())


def test_citation_cff_cites_the_tool_and_the_protsae_paper():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0"
    assert {"message", "title", "authors", "version", "license"} <= set(cff)
    assert cff["type"] == "software" and cff["version"] == protsae_cli.__version__ and cff["license"] == "MIT"
    paper = cff["preferred-citation"]
    assert paper["type"] == "article" and paper["title"].startswith("ProtSAE:")
    assert all(a.get("family-names") and a.get("given-names") for a in paper["authors"])
    arxiv = [i["value"] for i in paper["identifiers"] if i["type"] == "other"]
    assert arxiv == ["arXiv:2509.05309"]
    # The same paper the method notes cite (docs/METHOD.md §5), not another one.
    assert "arXiv 2509.05309" in (ROOT / "docs/METHOD.md").read_text()
    for ref in cff.get("references", []):
        assert ref["title"] and ref["authors"] and isinstance(ref["year"], int)


def render_meta_yaml() -> dict:
    """conda/meta.yaml rendered the way conda-build does (Jinja2, then YAML), with conda-build's helpers
    stubbed: pin_subpackage and PYTHON only shape the build, not what is checked here."""
    jinja2 = pytest.importorskip("jinja2")  # a snakemake dependency
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    template = env.from_string((ROOT / "conda/meta.yaml").read_text())
    text = template.render(PYTHON="python", pin_subpackage=lambda name, **kw: f"{name} >=0",
                           environ=os.environ)
    return yaml.safe_load(text)


def _conda_req(spec: str) -> tuple[str, SpecifierSet]:
    name, _, version = spec.partition(" ")
    return name, SpecifierSet(version.replace(" ", ""))


def test_conda_recipe_agrees_with_pyproject():
    meta = render_meta_yaml()
    assert meta["package"] == {"name": PROJECT["name"], "version": protsae_cli.__version__}
    assert (ROOT / "conda" / meta["source"]["path"] / "pyproject.toml").is_file()
    build = meta["build"]
    assert build["noarch"] == "python" and "pip install . " in build["script"] and "--no-deps" in build["script"]
    scripts = [f"{k} = {v}" for k, v in PROJECT["scripts"].items()]
    assert build["entry_points"] == scripts
    assert build["run_exports"]

    run = dict(_conda_req(s) for s in meta["requirements"]["run"])
    assert run.pop("python") == SpecifierSet(PROJECT["requires-python"])
    wanted = {}
    for dep in PROJECT["dependencies"]:
        req = Requirement(dep)
        wanted[CONDA_NAMES.get(req.name, req.name)] = req.specifier
    assert run == wanted, "conda/meta.yaml run requirements differ from pyproject.toml's dependencies"
    assert {"python", "pip"} <= {_conda_req(s)[0] for s in meta["requirements"]["host"]}

    commands = meta["test"]["commands"]
    assert "protsae --help" in commands and 'python -c "import protsae_cli"' in commands
    assert "protsae_cli" in meta["test"]["imports"]
    about = meta["about"]
    assert about["license"] == "MIT" and about["license_family"] == "MIT"
    assert (ROOT / about["license_file"]).is_file() and about["summary"]


def test_snakemake_conda_env_installs_this_version():
    env = yaml.safe_load((ROOT / "workflow/envs/protsae.yaml").read_text())
    assert env["channels"][0] == "local"  # where `conda build conda/` puts the package
    assert {"conda-forge", "bioconda"} <= set(env["channels"])
    assert env["dependencies"] == [f"protsae =={protsae_cli.__version__}"]


def _requirements_on(platform_system: str, extra: str) -> set[str]:
    environment = {**default_environment(), "platform_system": platform_system, "extra": extra,
                   "sys_platform": {"Linux": "linux", "Darwin": "darwin", "Windows": "win32"}[platform_system]}
    reqs = [Requirement(r) for r in PROJECT["optional-dependencies"][extra]]
    return {r.name for r in reqs if r.marker is None or r.marker.evaluate(environment)}


@pytest.mark.parametrize("system", ["Darwin", "Windows"])
def test_extras_install_where_triton_has_no_wheel(system):
    """triton publishes Linux wheels only, onnxruntime-gpu none for macOS: they are kept off where they
    cannot install, so `pip install '.[test]'` (and [gpu] on Windows) resolves there."""
    assert "triton" not in _requirements_on(system, "test")
    assert "triton" not in _requirements_on(system, "gpu")
    assert ("onnxruntime-gpu" in _requirements_on(system, "gpu")) == (system == "Windows")
    assert {"pytest", "hypothesis", "onnxruntime", "snakemake"} <= _requirements_on(system, "test")


def test_linux_test_extra_still_brings_triton():
    """The CPU suite runs the fused kernel in Triton's interpreter (TRITON_INTERPRET=1): .ci/run installs
    `.[test]` on Linux and must get triton from it."""
    assert "triton" in _requirements_on("Linux", "test")
    assert {"triton", "onnxruntime-gpu"} <= _requirements_on("Linux", "gpu")
    assert "'.[test]'" in (ROOT / ".ci/run").read_text()


BLOCK_TRITON = '''
import sys
class _NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _NoTriton())
'''


def test_triton_tests_skip_cleanly_without_triton(tmp_path):
    """As on macOS/Windows: with triton unimportable, the kernel and triton-backend tests skip, none errors."""
    (tmp_path / "no_triton_plugin.py").write_text(BLOCK_TRITON)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    probe = subprocess.run([sys.executable, "-c", "import no_triton_plugin, triton"], env=env, cwd=ROOT,
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'triton'" in probe.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no_triton_plugin", "-p", "no:cacheprovider", "-rs",
         "tests/encode/test_kernel_topk.py", "tests/encode/test_encode_backends.py", "-k", "triton or topk or kernel"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert re.search(r"SKIPPED \[\d+\] tests/encode/test_kernel_topk\.py:\d+: could not import 'triton'", out), out[-3000:]
    assert "error" not in out.splitlines()[-1], out[-3000:]
