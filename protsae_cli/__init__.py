"""protsae: per-residue biological concepts from protein language models via sparse autoencoders.

Kept import-light on purpose: ``protsae --version`` must not pull in torch.
"""

__version__ = "0.1.0"
