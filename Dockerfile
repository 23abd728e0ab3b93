# syntax=docker/dockerfile:1
#
# protsae GPU image: CUDA runtime + cuDNN, torch with CUDA, Triton, onnxruntime-gpu, and the bundled demo
# models (they are package data of protsae_cli.models, so installing the package bakes them in).
#
#   docker build -t protsae:0.1.0-cuda .
#   docker run --rm --gpus all -u "$(id -u):$(id -g)" --read-only --tmpfs /tmp -v "$PWD:/data" -w /data \
#       protsae:0.1.0-cuda protsae annotate proteins.fasta -o out/proteins
#
# Not root by default: USER is the unprivileged `protsae` (uid:gid 1000:1000, numeric so Kubernetes'
# runAsNonRoot can verify it), whose working directory /data it owns; -u overrides it as above.
#
# Built for workflow engines (docs/PIPELINES.md):
# * no ENTRYPOINT: Nextflow and Snakemake run `bash -c '...'` in the image, and `docker run IMAGE protsae ...`
#   must work as written;
# * bash and procps (`ps`) present: Nextflow's task wrapper needs both for its metrics;
# * any user id, read-only root filesystem (nf-core runs `-u $(id -u):$(id -g)`, Singularity images are
#   read-only): every cache and HOME point at /tmp, the one writable place both provide (and writable for the
#   default user too); the models are installed by root, world-readable and never written;
# * offline by default: the bundled models need no network; larger ESM-2 checkpoints are mounted into the
#   torch hub cache (-v ~/.cache/torch:/tmp/torch:ro) or given as paths with --model.

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# Same pin as .ci/run: the image runs the torch version the test suite ran. On PyPI the Linux x86_64 wheel of
# this version is the CUDA build. For hosts whose driver is older than that build's CUDA, pick a matching wheel:
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
ARG PROTSAE_VERSION=0.1.0
ARG VCS_REF=unknown
ARG SOURCE_URL=""

LABEL org.opencontainers.image.title="protsae" \
      org.opencontainers.image.description="Per-residue biological concepts from protein language models (ESM-2) via sparse autoencoders" \
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
ARG PROTSAE_UID=1000
ARG PROTSAE_GID=1000
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

# Install exactly as .ci/run does: the pinned torch first, then the package (here with the gpu extra instead
# of the test extra, and not editable). torch first so the package's unpinned `torch>=2.1` is already met.
RUN python -m pip install torch==${TORCH_VERSION} ${TORCH_INDEX_URL:+--index-url ${TORCH_INDEX_URL}}

WORKDIR /opt/protsae/src
COPY pyproject.toml README.md ./
COPY protsae_cli ./protsae_cli
COPY kernels ./kernels
COPY models ./models
# onnxruntime-gpu comes only with the gpu extra (it also runs on CPU); the CPU-only `onnxruntime` is a separate
# extra, so the two never overwrite each other's module.
RUN python -m pip install '.[gpu]' \
 && cd / && rm -rf /opt/protsae/src

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
