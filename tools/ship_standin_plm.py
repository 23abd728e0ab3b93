"""Convert the team's stand-in PLM (fair-esm hub .pt, fp32) into the shipped form: fp16 safetensors + JSON.

Shipping safetensors rather than a pickle means the default path never unpickles anything.
Usage: python tools/ship_standin_plm.py esm2_t6_8M_standin.pt protsae_cli/models/standin_plm
(the stand-in's fair-esm hub checkpoint, described in protsae_cli/models/standin_plm/README.md)
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
data = torch.load(src, map_location="cpu", weights_only=False)
cfg = data["cfg"]["model"]
state = {k: v.to(torch.float16).contiguous() for k, v in data["model"].items()}
dst.mkdir(parents=True, exist_ok=True)
save_file(state, str(dst / "esm2_t6_8M_standin.safetensors"), metadata={"format": "fair-esm-state-dict"})
(dst / "config.json").write_text(json.dumps({
    "name": "esm2_t6_8M_standin",
    "format": "fair-esm-state-dict",
    "encoder_layers": cfg.encoder_layers,
    "encoder_embed_dim": cfg.encoder_embed_dim,
    "encoder_ffn_embed_dim": cfg.encoder_ffn_embed_dim,
    "encoder_attention_heads": cfg.encoder_attention_heads,
    "token_dropout": cfg.token_dropout,
    "alphabet": "ESM-1b",
    "stored_dtype": "float16",
}, indent=2) + "\n")
print("wrote", dst)
