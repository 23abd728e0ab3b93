"""The Dockerfile, checked by structure (no Docker engine on the team's machines): what workflow engines need
from an image, and the same install steps as CI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped, as Docker parses."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # comment lines inside a continuation are removed by Docker
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions((ROOT / "Dockerfile").read_text())


def args_defaults(ins: list[tuple[str, str]]) -> dict[str, str]:
    out = {}
    for word, rest in ins:
        if word == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            out[k.strip()] = v.strip().strip('"')
    return out


def env_vars(ins: list[tuple[str, str]]) -> dict[str, str]:
    out = {}
    for word, rest in ins:
        if word == "ENV":
            for tok in shlex.split(rest):
                if "=" in tok:
                    k, _, v = tok.partition("=")
                    out[k] = v
    return out


def test_base_image_is_pinned_cuda_runtime(dockerfile):
    froms = [rest.split()[0] for word, rest in dockerfile if word == "FROM"]
    assert len(froms) == 1
    image = froms[0]
    name, _, tag = image.partition(":")
    assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"base image {image} must be pinned by version"
    assert name in ("nvidia/cuda", "pytorch/pytorch") and "runtime" in tag
    assert "$" not in image  # pinned in the file itself, not by a build argument someone may forget


def test_no_entrypoint_and_cmd_runs_protsae(dockerfile):
    words = [w for w, _ in dockerfile]
    assert "ENTRYPOINT" not in words
    cmd = [rest for w, rest in dockerfile if w == "CMD"]
    assert cmd and cmd[-1].startswith('["protsae"')


def test_bash_and_procps_installed(dockerfile):
    runs = " ".join(rest for w, rest in dockerfile if w == "RUN")
    install = re.search(r"apt-get install[^&]*", runs)
    assert install, "packages must come from apt-get install"
    pkgs = install.group(0).split()
    assert "procps" in pkgs and "bash" in pkgs


def test_caches_are_writable_for_any_uid_and_offline_by_default(dockerfile):
    env = env_vars(dockerfile)
    for var in ("HOME", "TORCH_HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR", "TRITON_CACHE_DIR"):
        assert env.get(var, "").startswith("/tmp"), f"{var} must point at /tmp (writable under any uid)"
    assert env.get("PROTSAE_OFFLINE") == "1"


def _expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), value)


def test_runs_as_a_fixed_non_root_user_with_a_writable_workdir(dockerfile):
    """Default user: a numeric non-zero uid (Kubernetes runAsNonRoot can only verify a numeric USER) that the
    image creates, owning the final WORKDIR; HOME and caches writable; models installed before the switch."""
    args = args_defaults(dockerfile)
    words = [w for w, _ in dockerfile]
    users = [_expand(rest, args) for w, rest in dockerfile if w == "USER"]
    assert users, "the image must not run as root by default"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and uid == "1000" and gid in ("", "1000"), users[-1]
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")  # nothing after runs as it

    runs = [_expand(rest, args) for w, rest in dockerfile if w == "RUN"]
    create = next((r for r in runs if "useradd" in r), "")
    assert re.search(r"useradd\b[^&]*--uid 1000\b", create), "the default user must be created with uid 1000"
    assert "userdel" in create, "Ubuntu 24.04 already has uid 1000 (ubuntu): it must be replaced, or useradd fails"
    workdir = [rest for w, rest in dockerfile if w == "WORKDIR"][-1]
    assert workdir != "/" and re.search(rf"install -d -o 1000 -g 1000 [^&]*{re.escape(workdir)}\b", create), \
        f"final WORKDIR {workdir} must be created owned by the default user"

    env = env_vars(dockerfile)
    assert env["HOME"] == "/tmp"  # writable for uid 1000, for any -u uid and under --read-only --tmpfs /tmp
    # The bundled models come in with the package, installed as root before USER: readable, not writable.
    pkg_step = next(i for i, r in enumerate(runs) if "pip install '.[gpu]'" in r)
    smoke = next(i for i, r in enumerate(runs) if "annotate" in r)
    assert pkg_step < smoke
    # ... and the build-time smoke test proves it by annotating as the default user and as an arbitrary uid.
    assert re.search(r"for uid in 1000 \d+", runs[smoke]) and "setpriv --reuid=${uid}" in runs[smoke]


def test_oci_labels(dockerfile):
    labels = " ".join(rest for w, rest in dockerfile if w == "LABEL")
    for key in ("source", "version", "revision", "licenses", "title"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_install_steps_match_ci(dockerfile):
    """Pinned torch first, then the package, exactly as .ci/run (which the README's install mirrors)."""
    ci = (ROOT / ".ci/run").read_text()
    ci_installs = re.findall(r"pip install[^\n]*", ci)
    ci_torch = re.search(r"torch==([\w.+]+)", ci_installs[0])
    assert ci_torch, "CI's first install must be the pinned torch"
    assert any(re.search(r"install .*'?\.\[", line) for line in ci_installs[1:]), "CI installs the package second"

    assert args_defaults(dockerfile)["TORCH_VERSION"] == ci_torch.group(1)
    runs = [rest for w, rest in dockerfile if w == "RUN"]
    torch_step = next(i for i, r in enumerate(runs) if re.search(r"pip install torch==\$\{TORCH_VERSION\}", r))
    pkg_step = next(i for i, r in enumerate(runs) if re.search(r"pip install '\.\[gpu\]'", r))
    assert torch_step < pkg_step

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert any(e.startswith("triton") for e in extras) and any(e.startswith("onnxruntime-gpu") for e in extras)


def test_models_are_copied_and_shipped_as_package_data(dockerfile):
    copies = [rest.split() for w, rest in dockerfile if w == "COPY"]
    sources = {s.rstrip("/") for c in copies for s in c[:-1] if not s.startswith("--")}
    assert {"pyproject.toml", "README.md", "protsae_cli", "kernels", "models"} <= sources
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "**/*.safetensors" in data["protsae_cli.models"]

    # .dockerignore is an allow-list: everything the COPY lines need must be let back in, and nothing else.
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert sources <= allowed
    assert not ({".git", "tests", "bench"} & allowed)


def test_docs_show_a_docker_run_line_for_pipelines():
    doc = (ROOT / "docs/PIPELINES.md").read_text()
    runs = [line for line in doc.splitlines() if "docker run" in line]
    assert any("--gpus all" in line for line in runs)
    assert any("protsae annotate" in line for line in doc.splitlines() if "docker run" in line or "\\" in line)
    assert "-u \"$(id -u):$(id -g)\"" in doc or "-u $(id -u):$(id -g)" in doc
