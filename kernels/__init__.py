"""Triton kernels (installed as `protsae_cli.kernels`). Import triton lazily: CPU-only installs lack a GPU."""
