"""onnxruntime encode backend: the graph `protsae_cli.encode.onnx_export` writes, run in row chunks.

ONNX cannot fuse the GEMM with TopK, so every chunk materialises an fp32 [chunk_rows, d_sae] pre-activation
tensor (8,192 x 10,240 x 4 B = 336 MB); `chunk_rows` bounds that. The CUDA execution provider is used when
the device is CUDA and the installed onnxruntime has it, else the CPU provider.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from protsae_cli.errors import InputError


class OnnxEncoder:
    name = "onnx"

    def __init__(self, sae_or_path, device: torch.device | str = "cpu", chunk_rows: int = 8192,
                 threads: int | None = None):
        """`sae_or_path`: an SAE module (exported in memory first) or the path of an `export-onnx` file."""
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise InputError(f"--backend onnx needs the `onnxruntime` package ({e}); or use --backend torch") from e
        if chunk_rows < 1:
            raise InputError(f"chunk_rows must be positive, got {chunk_rows}")
        self.device = torch.device(device)
        self.chunk_rows = int(chunk_rows)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        providers: list = ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device.index or 0}))
        if isinstance(sae_or_path, (str, os.PathLike)):
            from protsae_cli.encode.onnx_export import load_onnx_config

            path = Path(sae_or_path)
            cfg = load_onnx_config(path)  # refuses files that are not protsae encoder exports
            self.k, self.d_model = int(cfg.k), int(cfg.d_model)
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        else:
            from protsae_cli.encode.onnx_export import _EXTERNAL_DATA_BYTES, build_onnx_model, export_onnx

            self.k, self.d_model = int(sae_or_path.cfg.k), int(sae_or_path.cfg.d_model)
            if int(sae_or_path.cfg.d_sae) * self.d_model * 4 < _EXTERNAL_DATA_BYTES:
                model = build_onnx_model(sae_or_path, sae_sha256="-")  # digest irrelevant in memory
                self.session = ort.InferenceSession(model.SerializeToString(), sess_options=opts,
                                                    providers=providers)
            else:  # too big for one protobuf message: go through a file with external data
                import tempfile

                with tempfile.TemporaryDirectory() as tmp:
                    p = export_onnx(sae_or_path, Path(tmp) / "sae.onnx", sae_sha256="-")
                    self.session = ort.InferenceSession(str(p), sess_options=opts, providers=providers)
        self.providers = self.session.get_providers()

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(idx int64 [N, k], val float32 [N, k]) on the encoder's device, in the canonical order."""
        from protsae_cli.sae.topk import canonical_order
        from protsae_cli.encode.onnx_export import INPUT_NAME, OUTPUT_INDICES, OUTPUT_VALUES

        if x.dim() != 2 or x.shape[1] != self.d_model:
            raise InputError(f"expected activations [N, {self.d_model}], got {tuple(x.shape)}")
        idxs, vals = [], []
        for s in range(0, x.shape[0], self.chunk_rows):
            xc = x[s:s + self.chunk_rows].detach().to("cpu", torch.float32).contiguous().numpy()
            i, v = self.session.run([OUTPUT_INDICES, OUTPUT_VALUES], {INPUT_NAME: xc})
            idxs.append(torch.from_numpy(i))
            vals.append(torch.from_numpy(v))
        if not idxs:
            return (torch.empty(0, self.k, dtype=torch.int64, device=self.device),
                    torch.empty(0, self.k, dtype=torch.float32, device=self.device))
        idx, val = (torch.cat(idxs), torch.cat(vals)) if len(idxs) > 1 else (idxs[0], vals[0])
        # ONNX specifies lower-index-first for equal values and the graph maps zeros to -1 already; the
        # re-sort guards against an execution provider that orders ties differently.
        idx, val = canonical_order(idx, val)
        return idx.to(self.device), val.to(self.device)
