"""A format-independent identity for ESM-2 weights: the sha256 of what the model computes with, not of a file.

Why: the pairing check compared file checksums, and a fair-esm `.pt` pickle and a Hugging Face safetensors file
of the same weights are different files, so an SAE trained on one could not be confirmed on the other. Every
loader builds the same fair-esm `ESM2` (hf_esm.py renames HF keys into its layout), so hashing that module's
state dict gives one digest per set of weights whatever file they came from.

What is hashed, in this order:

- a version line (`protsae-esm2-weights-v1`), so a later change of the recipe cannot collide with this one;
- the architecture that shapes the activations but is no tensor: layers, width, attention heads, token dropout;
- for each state-dict key in sorted order, except `lm_head.*` and `contact_head.*`: the key, the dtype, the
  shape and the tensor's raw bytes (C order, as loaded: protsae loads every PLM as float32).

The LM head and the contact head are left out because no hook activation depends on them (an SAE reads
activations), and because they are optional in both formats: an HF `EsmModel` checkpoint has no LM head, and
a fair-esm `.pt` carries its contact head in a separate file. The digest is therefore an identity of the
activations at every hook, not of the logits.

Cost: one pass over the weights in memory (sha256 is the bottleneck); docs/MODELS.md §3 has the measurement.
`LoadedPLM.weights_sha256` computes it on first use only, which the pairing check needs only when the file
checksums differ, and training once per run.
"""

from __future__ import annotations

import hashlib
from typing import Any

DIGEST_VERSION = "protsae-esm2-weights-v1"
#: State-dict prefixes left out of the digest (no hook activation depends on them).
EXCLUDED_PREFIXES = ("lm_head.", "contact_head.")


def hashed_keys(state: dict[str, Any]) -> list[str]:
    """The state-dict keys the digest covers, in the order they are hashed."""
    return sorted(k for k in state if not k.startswith(EXCLUDED_PREFIXES))


def weights_sha256(model: Any) -> str:
    """Digest of a fair-esm `ESM2` module's weights (see the module docstring for exactly what is hashed)."""
    import torch

    h = hashlib.sha256()
    arch = (f"layers={int(model.num_layers)} embed_dim={int(model.embed_dim)} "
            f"heads={int(model.attention_heads)} token_dropout={bool(model.token_dropout)}")
    h.update(f"{DIGEST_VERSION}\n{arch}\n".encode())
    state = model.state_dict()
    for key in hashed_keys(state):
        t = state[key].detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        h.update(f"{key}\0{dtype}\0{list(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()
