# syntax=docker/dockerfile:1
#
# protsae images, two targets of one file (both with the bundled demo models, which are package data of
# protsae_cli.models, so installing the package bakes them in):
#
#   cpu   Ubuntu 24.04 + the CPU-only torch wheel (about 1 GB smaller, no driver needed) + protsae[onnx]
#   cuda  CUDA runtime + cuDNN + the CUDA torch build + protsae[gpu] (Triton, onnxruntime-gpu); the default
#         target (the last stage), so `docker build .` builds it as before
#
#   docker build --target cpu  -t protsae:0.1.0-cpu  .
#   docker build --target cuda -t protsae:0.1.0-cuda .
#   docker run --rm -u "$(id -u):$(id -g)" --read-only --tmpfs /tmp -v "$PWD:/data" -w /data \
#       protsae:0.1.0-cpu protsae annotate proteins.fasta -o out/proteins
#   docker run --rm --gpus all -u "$(id -u):$(id -g)" --read-only --tmpfs /tmp -v "$PWD:/data" -w /data \
#       protsae:0.1.0-cuda protsae annotate proteins.fasta -o out/proteins
#   apptainer build protsae-0.1.0-cpu.sif docker-daemon://protsae:0.1.0-cpu      # Singularity/Apptainer
#   apptainer run --nv protsae-0.1.0-cuda.sif protsae annotate proteins.fasta -o out/proteins
#
# Not root by default: USER is the unprivileged `protsae` (uid:gid 1000:1000, numeric so Kubernetes'
# runAsNonRoot can verify it), whose working directory /data it owns; -u overrides it as above.
#
# Built for workflow engines (docs/PIPELINES.md):
# * no ENTRYPOINT: Nextflow and Snakemake run `bash -c '...'` in the image, and `docker run IMAGE protsae ...`
#   must work as written; no HEALTHCHECK either: protsae is a batch command, not a service, and a health probe
#   would only start a second Python process inside every job;
# * bash and procps (`ps`) present: Nextflow's task wrapper needs both for its metrics;
# * any user id, read-only root filesystem (nf-core runs `-u $(id -u):$(id -g)`, Singularity images are
#   read-only): every cache and HOME point at /tmp, the one writable place both provide (and writable for the
#   default user too); the models are installed by root, world-readable and never written;
# * offline by default: the bundled models need no network; larger ESM-2 checkpoints are mounted into the
#   torch hub cache (-v ~/.cache/torch:/tmp/torch:ro) or given as paths with --model.
#
# The two targets run the same steps; tests/test_dockerfile.py checks that they differ only in the base image,
# the torch index, the package extra and the C toolchain Triton needs.

# Same pin as .ci/run: the images run the torch version the test suite ran.
ARG TORCH_VERSION=2.13.0
ARG PROTSAE_VERSION=0.1.0
ARG VCS_REF=unknown
ARG SOURCE_URL=""
ARG PROTSAE_UID=1000
ARG PROTSAE_GID=1000

# What the images install, in one stage both bind-mount (so no image layer keeps a copy of the sources).
FROM scratch AS src
COPY pyproject.toml README.md LICENSE /src/
COPY protsae_cli /src/protsae_cli


# ---------------------------------------------------------------------------------------------------- cpu ---
FROM ubuntu:24.04 AS cpu

ARG TORCH_VERSION
# PyTorch's CPU index: its Linux x86_64 wheels carry no CUDA libraries (PyPI's carry several GB of them).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PROTSAE_VERSION
ARG VCS_REF
ARG SOURCE_URL
ARG PROTSAE_UID
ARG PROTSAE_GID

LABEL org.opencontainers.image.title="protsae" \
      org.opencontainers.image.description="Per-residue biological concepts from protein language models (ESM-2) via sparse autoencoders (CPU)" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.version="${PROTSAE_VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="docker.io/library/ubuntu:24.04" \
      software="protsae" \
      software.version="${PROTSAE_VERSION}"

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        bash procps ca-certificates python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*

# The default user. Ubuntu 24.04 images ship a user `ubuntu` with uid 1000: it is replaced so the uid is ours.
# Its home is /tmp like HOME below (writable under any uid); /data is its own writable working directory.
RUN if getent passwd ubuntu > /dev/null; then userdel --remove ubuntu; fi \
 && groupadd --gid ${PROTSAE_GID} protsae \
 && useradd --uid ${PROTSAE_UID} --gid ${PROTSAE_GID} --no-create-home --home-dir /tmp --shell /bin/bash \
        --no-log-init protsae \
 && install -d -o ${PROTSAE_UID} -g ${PROTSAE_GID} -m 0755 /data

# A virtual environment, because Ubuntu 24.04's system Python refuses pip installs (PEP 668).
ENV VIRTUAL_ENV=/opt/protsae/venv \
    PATH=/opt/protsae/venv/bin:${PATH} \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python3 -m venv "${VIRTUAL_ENV}"

# Install as .ci/run does: the pinned torch first (so the package's unpinned `torch>=2.1` is already met),
# then the package, not editable, with the onnx extra (CPU onnxruntime) instead of the test extra.
RUN python -m pip install torch==${TORCH_VERSION} ${TORCH_INDEX_URL:+--index-url ${TORCH_INDEX_URL}}
RUN --mount=type=bind,from=src,source=/src,target=/opt/protsae/src,rw \
    cd /opt/protsae/src && python -m pip install '.[onnx]'

ENV HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCH_HOME=/tmp/torch \
    HF_HOME=/tmp/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib \
    TRITON_CACHE_DIR=/tmp/triton \
    NUMBA_CACHE_DIR=/tmp/numba \
    PROTSAE_OFFLINE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Smoke test at build time, on CPU, as the default user and as an arbitrary one (as `-u` gives): the CLI starts,
# the bundled models are inside the image and readable, an annotation runs offline without writing anywhere but
# /tmp (a fresh /tmp for each, as at run time), and the default user can write its working directory.
RUN protsae --version \
 && printf '>smoke test\nMKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ\n' > /tmp/smoke.fasta \
 && for uid in ${PROTSAE_UID} 54321; do \
        rm -rf /tmp/.cache /tmp/torch /tmp/huggingface /tmp/matplotlib /tmp/triton /tmp/numba \
     && setpriv --reuid=${uid} --regid=${uid} --clear-groups \
            protsae -q annotate /tmp/smoke.fasta -o - --formats tsv --device cpu > /tmp/smoke.tsv \
     && grep -q '^#protein_id' /tmp/smoke.tsv || exit 1; \
    done \
 && setpriv --reuid=${PROTSAE_UID} --regid=${PROTSAE_GID} --clear-groups sh -c 'touch /data/.w && rm /data/.w' \
 && rm -rf /tmp/* /tmp/.cache

USER ${PROTSAE_UID}:${PROTSAE_GID}
WORKDIR /data
CMD ["protsae", "--help"]


# --------------------------------------------------------------------------------------------------- cuda ---
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS cuda

ARG TORCH_VERSION
# Empty: PyPI, whose Linux x86_64 wheel of this version is the CUDA build. For hosts whose driver is older
# than that build's CUDA, pick a matching wheel: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_INDEX_URL=""
ARG PROTSAE_VERSION
ARG VCS_REF
ARG SOURCE_URL
ARG PROTSAE_UID
ARG PROTSAE_GID

LABEL org.opencontainers.image.title="protsae" \
      org.opencontainers.image.description="Per-residue biological concepts from protein language models (ESM-2) via sparse autoencoders (CUDA)" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.version="${PROTSAE_VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="docker.io/nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04" \
      software="protsae" \
      software.version="${PROTSAE_VERSION}"

# gcc, libc6-dev and python3-dev: Triton compiles a small launcher stub with the system C compiler the first
# time a kernel runs, and needs Python.h for it.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        bash procps ca-certificates python3 python3-venv python3-dev gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

# The default user. Ubuntu 24.04 images ship a user `ubuntu` with uid 1000: it is replaced so the uid is ours.
# Its home is /tmp like HOME below (writable under any uid); /data is its own writable working directory.
RUN if getent passwd ubuntu > /dev/null; then userdel --remove ubuntu; fi \
 && groupadd --gid ${PROTSAE_GID} protsae \
 && useradd --uid ${PROTSAE_UID} --gid ${PROTSAE_GID} --no-create-home --home-dir /tmp --shell /bin/bash \
        --no-log-init protsae \
 && install -d -o ${PROTSAE_UID} -g ${PROTSAE_GID} -m 0755 /data

# A virtual environment, because Ubuntu 24.04's system Python refuses pip installs (PEP 668).
ENV VIRTUAL_ENV=/opt/protsae/venv \
    PATH=/opt/protsae/venv/bin:${PATH} \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python3 -m venv "${VIRTUAL_ENV}"

# Install as .ci/run does: the pinned torch first, then the package with the gpu extra. onnxruntime-gpu comes
# only with the gpu extra (it also runs on CPU); the CPU-only `onnxruntime` is a separate extra, so the two
# never overwrite each other's module.
RUN python -m pip install torch==${TORCH_VERSION} ${TORCH_INDEX_URL:+--index-url ${TORCH_INDEX_URL}}
RUN --mount=type=bind,from=src,source=/src,target=/opt/protsae/src,rw \
    cd /opt/protsae/src && python -m pip install '.[gpu]'

ENV HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCH_HOME=/tmp/torch \
    HF_HOME=/tmp/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib \
    TRITON_CACHE_DIR=/tmp/triton \
    NUMBA_CACHE_DIR=/tmp/numba \
    PROTSAE_OFFLINE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Smoke test at build time, on CPU, as the default user and as an arbitrary one (as `-u` gives): the CLI starts,
# the bundled models are inside the image and readable, an annotation runs offline without writing anywhere but
# /tmp (a fresh /tmp for each, as at run time), and the default user can write its working directory.
RUN protsae --version \
 && printf '>smoke test\nMKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ\n' > /tmp/smoke.fasta \
 && for uid in ${PROTSAE_UID} 54321; do \
        rm -rf /tmp/.cache /tmp/torch /tmp/huggingface /tmp/matplotlib /tmp/triton /tmp/numba \
     && setpriv --reuid=${uid} --regid=${uid} --clear-groups \
            protsae -q annotate /tmp/smoke.fasta -o - --formats tsv --device cpu > /tmp/smoke.tsv \
     && grep -q '^#protein_id' /tmp/smoke.tsv || exit 1; \
    done \
 && setpriv --reuid=${PROTSAE_UID} --regid=${PROTSAE_GID} --clear-groups sh -c 'touch /data/.w && rm /data/.w' \
 && rm -rf /tmp/* /tmp/.cache

USER ${PROTSAE_UID}:${PROTSAE_GID}
WORKDIR /data
CMD ["protsae", "--help"]
