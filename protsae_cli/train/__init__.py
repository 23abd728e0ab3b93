"""Training SAEs (TopK and ProtSAE) on hooked ESM-2 activations."""
