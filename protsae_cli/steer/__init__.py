"""Steering ESM-2 toward a concept by editing SAE latents at the hook (protsae steer)."""
