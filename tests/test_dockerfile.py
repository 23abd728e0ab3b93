"""The Dockerfile, checked by structure (no Docker engine on the team's machines): two targets (cpu, cuda) that
give workflow engines what they need from an image, install as CI does, and differ only where they must."""

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


TARGETS = ("cpu", "cuda")
# The only instructions the two targets may differ in (anything else is drift between copies of one recipe).
CUDA_ONLY_PACKAGES = ("python3-dev", "gcc", "libc6-dev")  # Triton's launcher stub is compiled at run time
EXTRA = {"cpu": "onnx", "cuda": "gpu"}


def stages(ins: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], dict[str, list[tuple[str, str]]]]:
    """(instructions before the first FROM, {stage name: its instructions from its FROM on}), in file order."""
    glob: list[tuple[str, str]] = []
    out: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for word, rest in ins:
        if word == "FROM":
            parts = rest.split()
            assert len(parts) == 3 and parts[1].upper() == "AS", f"every stage is named: FROM {rest}"
            current = out.setdefault(parts[2], [])
        (glob if current is None else current).append((word, rest))
    return glob, out


@pytest.fixture(scope="module")
def parsed() -> tuple[list[tuple[str, str]], dict[str, list[tuple[str, str]]]]:
    return stages(instructions((ROOT / "Dockerfile").read_text()))


@pytest.fixture(scope="module", params=TARGETS)
def target(request, parsed) -> tuple[str, list[tuple[str, str]]]:
    return request.param, parsed[1][request.param]


def args_defaults(glob: list[tuple[str, str]], stage: list[tuple[str, str]]) -> dict[str, str]:
    """Build-argument defaults as a stage sees them: its own ARG defaults over the global ones it redeclares."""
    def defaults(ins):
        out = {}
        for word, rest in ins:
            if word == "ARG":
                k, eq, v = rest.partition("=")
                out[k.strip()] = v.strip().strip('"') if eq else None
        return out
    top, own = defaults(glob), defaults(stage)
    return {k: (v if v is not None else top.get(k, "")) for k, v in own.items()}


def env_vars(ins: list[tuple[str, str]]) -> dict[str, str]:
    out = {}
    for word, rest in ins:
        if word == "ENV":
            for tok in shlex.split(rest):
                if "=" in tok:
                    k, _, v = tok.partition("=")
                    out[k] = v
    return out


def _expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), value)


def test_two_targets_with_pinned_bases_and_cuda_by_default(parsed):
    _, st = parsed
    assert {"src", "cpu", "cuda"} <= set(st)
    assert list(st)[-1] == "cuda", "cuda stays the last stage: `docker build .` without --target builds it, as before"
    bases = {name: ins[0][1].split()[0] for name, ins in st.items()}
    assert bases["src"] == "scratch"
    for name in TARGETS:
        image = bases[name]
        repo, _, tag = image.partition(":")
        assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"{name}: base image {image} must be pinned"
        assert "$" not in image  # pinned in the file itself, not by a build argument someone may forget
    assert bases["cpu"] == "ubuntu:24.04"  # the OS of the CUDA base, so both install the same apt packages
    repo, _, tag = bases["cuda"].partition(":")
    assert repo == "nvidia/cuda" and "runtime" in tag and tag.endswith("ubuntu24.04")


def test_no_entrypoint_no_healthcheck_and_cmd_runs_protsae(parsed, target):
    """Engines run `bash -c` in the image, so no ENTRYPOINT; a batch tool has no health to probe."""
    glob, st = parsed
    words = [w for ins in st.values() for w, _ in ins] + [w for w, _ in glob]
    assert "ENTRYPOINT" not in words and "HEALTHCHECK" not in words
    cmd = [rest for w, rest in target[1] if w == "CMD"]
    assert cmd == ['["protsae", "--help"]']


def test_bash_and_procps_installed(target):
    runs = " ".join(rest for w, rest in target[1] if w == "RUN")
    install = re.search(r"apt-get install[^&]*", runs)
    assert install, "packages must come from apt-get install"
    pkgs = install.group(0).split()
    assert "procps" in pkgs and "bash" in pkgs
    assert all(p in pkgs for p in CUDA_ONLY_PACKAGES) == (target[0] == "cuda")


def test_caches_are_writable_for_any_uid_and_offline_by_default(target):
    env = env_vars(target[1])
    for var in ("HOME", "TORCH_HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR", "TRITON_CACHE_DIR"):
        assert env.get(var, "").startswith("/tmp"), f"{var} must point at /tmp (writable under any uid)"
    assert env.get("PROTSAE_OFFLINE") == "1"


def test_runs_as_a_fixed_non_root_user_with_a_writable_workdir(parsed, target):
    """Default user: a numeric non-zero uid (Kubernetes runAsNonRoot can only verify a numeric USER) that the
    image creates, owning the final WORKDIR; HOME and caches writable; models installed before the switch."""
    name, ins = target
    args = args_defaults(parsed[0], ins)
    words = [w for w, _ in ins]
    users = [_expand(rest, args) for w, rest in ins if w == "USER"]
    assert users, f"{name}: the image must not run as root by default"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and uid == "1000" and gid in ("", "1000"), users[-1]
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")  # nothing after runs as it

    runs = [_expand(rest, args) for w, rest in ins if w == "RUN"]
    create = next((r for r in runs if "useradd" in r), "")
    assert re.search(r"useradd\b[^&]*--uid 1000\b", create), "the default user must be created with uid 1000"
    assert "userdel" in create, "Ubuntu 24.04 already has uid 1000 (ubuntu): it must be replaced, or useradd fails"
    workdir = [rest for w, rest in ins if w == "WORKDIR"][-1]
    assert workdir == "/data" and re.search(rf"install -d -o 1000 -g 1000 [^&]*{re.escape(workdir)}\b", create), \
        f"final WORKDIR {workdir} must be created owned by the default user"

    env = env_vars(ins)
    assert env["HOME"] == "/tmp"  # writable for uid 1000, for any -u uid and under --read-only --tmpfs /tmp
    # The bundled models come in with the package, installed as root before USER: readable, not writable.
    pkg_step = next(i for i, r in enumerate(runs) if f"pip install '.[{EXTRA[name]}]'" in r)
    smoke = next(i for i, r in enumerate(runs) if "annotate" in r)
    assert pkg_step < smoke
    # ... and the build-time smoke test proves it by annotating as the default user and as an arbitrary uid.
    assert re.search(r"for uid in 1000 \d+", runs[smoke]) and "setpriv --reuid=${uid}" in runs[smoke]


def test_oci_labels(parsed, target):
    labels = " ".join(rest for w, rest in target[1] if w == "LABEL")
    for key in ("source", "version", "revision", "licenses", "title", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels
    base = target[1][0][1].split()[0]
    named = re.search(r'org\.opencontainers\.image\.base\.name="([^"]+)"', labels).group(1)
    assert named.endswith("/" + base), f"{target[0]}: base.name {named} is not the FROM image {base}"


def test_install_steps_match_ci(parsed, target):
    """Pinned torch first, then the package, as .ci/run (which the README's install mirrors); the CPU target
    takes torch from PyTorch's CPU index, the CUDA target from PyPI (the CUDA build)."""
    name, ins = target
    ci = (ROOT / ".ci/run").read_text()
    ci_installs = re.findall(r"pip install[^\n]*", ci)
    ci_torch = re.search(r"torch==([\w.+]+)", ci_installs[0])
    assert ci_torch, "CI's first install must be the pinned torch"
    assert any(re.search(r"install .*'?\.\[", line) for line in ci_installs[1:]), "CI installs the package second"

    args = args_defaults(parsed[0], ins)
    assert args["TORCH_VERSION"] == ci_torch.group(1)
    assert args["TORCH_INDEX_URL"] == {"cpu": "https://download.pytorch.org/whl/cpu", "cuda": ""}[name]
    runs = [rest for w, rest in ins if w == "RUN"]
    torch_step = next(i for i, r in enumerate(runs)
                      if re.search(r"pip install torch==\$\{TORCH_VERSION\} \$\{TORCH_INDEX_URL:\+--index-url "
                                   r"\$\{TORCH_INDEX_URL\}\}", r))
    pkg_step = next(i for i, r in enumerate(runs) if re.search(rf"pip install '\.\[{EXTRA[name]}\]'", r))
    assert torch_step < pkg_step

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    if name == "cuda":
        assert any(e.startswith("triton") for e in extras["gpu"])
        assert any(e.startswith("onnxruntime-gpu") for e in extras["gpu"])
    else:  # the CPU onnxruntime, never the GPU one (they install the same module)
        assert [e for e in extras["onnx"] if e.startswith("onnxruntime")] == ["onnxruntime>=1.17"]


def test_models_are_installed_in_both_targets_and_shipped_as_package_data(parsed, target):
    """The sources (models included) come from the `src` stage, bind-mounted into the install step: every target
    installs them, and no layer of the image keeps a second copy of the sources."""
    _, st = parsed
    copies = [rest.split() for w, rest in st["src"] if w == "COPY"]
    sources = {s.rstrip("/") for c in copies for s in c[:-1] if not s.startswith("--")}
    assert {"pyproject.toml", "README.md", "LICENSE", "protsae_cli"} <= sources
    assert {c[-1] for c in copies if "protsae_cli" in c} == {"/src/protsae_cli"}  # models are inside it

    name, ins = target
    assert not [rest for w, rest in ins if w in ("COPY", "ADD")], f"{name}: sources come only from the src stage"
    install = next(rest for w, rest in ins if w == "RUN" and f"'.[{EXTRA[name]}]'" in rest)
    mount = re.search(r"--mount=(\S+)", install)
    assert mount, install
    opts = dict(kv.partition("=")[::2] for kv in mount.group(1).split(","))
    assert opts["type"] == "bind" and opts["from"] == "src" and opts["source"] == "/src" and "rw" in opts
    assert f"cd {opts['target']} && python -m pip install '.[{EXTRA[name]}]'" in install

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "**/*.safetensors" in data["protsae_cli.models"]

    # .dockerignore is an allow-list: everything the COPY lines need must be let back in, and nothing else.
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert sources <= allowed
    assert not ({".git", "tests", "bench"} & allowed)


def _normalized(name: str, ins: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A target's instructions less what may differ between targets (base, description, torch index, the
    extra, Triton's C toolchain), so that what remains must be the same recipe word for word."""
    out = []
    for word, rest in ins[1:]:  # [0] is FROM
        if word == "ARG" and rest.startswith("TORCH_INDEX_URL"):
            continue
        if word == "LABEL":
            rest = re.sub(r'(image\.(description|base\.name))="[^"]*"', r'\1=""', rest)
        if word == "RUN":
            rest = rest.replace(f"'.[{EXTRA[name]}]'", "'.[EXTRA]'")
            for pkg in CUDA_ONLY_PACKAGES:
                rest = re.sub(rf"\s{re.escape(pkg)}(?=\s)", "", rest)
        out.append((word, " ".join(rest.split())))
    return out


def test_targets_differ_only_where_they_must(parsed):
    _, st = parsed
    cpu, cuda = _normalized("cpu", st["cpu"]), _normalized("cuda", st["cuda"])
    for i, (a, b) in enumerate(zip(cpu, cuda)):
        assert a == b, f"instruction {i + 2} differs between the cpu and cuda targets:\n  {a}\n  {b}"
    assert len(cpu) == len(cuda)


def test_docs_show_build_run_and_apptainer_lines():
    doc = (ROOT / "docs/PIPELINES.md").read_text()
    lines = doc.splitlines()
    runs = [line for line in lines if "docker run" in line]
    assert any("--gpus all" in line for line in runs) and any("--gpus" not in line for line in runs)
    assert any("protsae annotate" in line for line in runs)
    assert "-u \"$(id -u):$(id -g)\"" in doc or "-u $(id -u):$(id -g)" in doc
    for name in TARGETS:
        assert any(re.search(rf"docker build --target {name}\s+-t protsae:\S*{name}\b", line) for line in lines), name
    assert any(re.search(r"apptainer build \S+\.sif\s+docker(-daemon)?://\S*protsae:\S*cpu", line) for line in lines)
    assert any("apptainer" in line and "--nv" in line for line in lines)
