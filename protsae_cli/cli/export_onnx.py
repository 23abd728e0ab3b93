"""`protsae export-onnx`: an SAE checkpoint in, an ONNX encoder file out (`protsae_cli.encode.onnx_export`)."""

from __future__ import annotations

import logging
from pathlib import Path

import typer


def command(
    sae: Path = typer.Option(..., "--sae", show_default=False,
                             help="SAE checkpoint: a directory with config.json + sae.safetensors, or a .safetensors "
                                  "file with the config embedded."),
    output: Path = typer.Option(..., "--output", "-o", show_default=False,
                                help="ONNX file to write (replaced atomically)."),
    opset: int = typer.Option(17, "--opset", min=11, help="ONNX opset (11 or newer: TopK with largest/sorted)."),
) -> None:
    """Export an SAE's encoder to ONNX: activations (rows x d_model) in, top-k indices and values out.

    The graph is the folded encoder affine, ReLU and TopK with constant k, in fp32, with a dynamic row axis.
    Outputs: indices int64 and values float32, both rows x k; values descend, equal values list the lower
    latent first, empty slots are index -1 / value 0 (the same codes as every protsae backend).

    The full SAE config (PLM, hook, layer, concepts) and the weights' sha256 are embedded as model metadata,
    so the file alone can be checked against a PLM.

    Example: [bold]protsae export-onnx --sae my_sae/ -o my_sae.onnx[/bold]
    """
    from protsae_cli.encode.onnx_export import export_onnx_from_dir

    path, cfg = export_onnx_from_dir(sae, output, opset=opset)
    logging.getLogger("protsae.export_onnx").info(
        "wrote %s (%.1f MB): d_model=%d d_sae=%d k=%d, hook %s@%d, opset %d", path, path.stat().st_size / 1e6,
        cfg.d_model, cfg.d_sae, cfg.k, cfg.hook_point, cfg.layer, opset)
