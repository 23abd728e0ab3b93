"""Sparse autoencoders: the SAE interface, its architectures, their configs and checkpoint I/O."""
