"""Export an SAE encoder to ONNX: x [rows, d_model] -> (indices int64 [rows, k], values float32 [rows, k]).

The graph is written by hand with `onnx.helper` rather than traced through `torch.onnx`: it is five
operators (MatMul, Add, Relu, TopK, Where), the tracer's behaviour has changed across torch releases (the
torch.export-based exporter needs onnxscript), and writing it directly pins exactly the semantics every
backend shares:

* the folded affine from `encoder_affine()` (normalisation and b_dec already inside W, b), fp32;
* TopK with constant k on the last axis, largest, sorted -- ONNX specifies that equal values come out
  lower index first, which is our tie rule;
* zeros after ReLU reported as idx -1 (an in-graph Where), values stay 0;
* only the row axis is dynamic ("rows");
* a ProtSAE that admits its calls first (`priority_latents` p > 0) gets a second small GEMM for latents 0..p-1
  and the priority selection over the p + k candidates (`_priority_topk_nodes`), as the Triton backend does.

The file carries the full SAE config JSON (`protsae_config`) and the weights' sha256 (`protsae_sae_sha256`)
as model metadata, so the file alone can be checked against a PLM (`load_onnx_config`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from protsae_cli.errors import InputError
from protsae_cli.sae.config import FORMAT, SAEConfig

ONNX_FORMAT = "protsae-sae-encoder-onnx"
META_CONFIG = "protsae_config"
META_SHA = "protsae_sae_sha256"
META_FORMAT = "protsae_format"
MIN_OPSET = 11  # TopK with `largest`/`sorted` and K as an input
INPUT_NAME, OUTPUT_INDICES, OUTPUT_VALUES = "x", "indices", "values"
# Protobuf messages cannot exceed 2 GiB; larger encoders keep their weights in a side file.
_EXTERNAL_DATA_BYTES = 1_800_000_000


def state_sha256(sae) -> str:
    """sha256 of the module's tensors serialised as `save_sae` writes sae.safetensors (same bytes, so the
    same digest as the checkpoint file that `load_sae` reports for an unmodified module)."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sae.state_dict().items()}
    return hashlib.sha256(save(tensors, metadata={"format": FORMAT})).hexdigest()


def _max_opset() -> int:
    import onnx.defs

    return int(onnx.defs.onnx_opset_version())


def build_onnx_model(sae, opset: int = 17, sae_sha256: str | None = None):
    """The encoder as an in-memory `onnx.ModelProto` (weights as initializers)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from protsae_cli import __version__

    if not MIN_OPSET <= opset <= _max_opset():
        raise InputError(f"--opset must be in {MIN_OPSET}..{_max_opset()} (this onnx package), got {opset}")
    cfg: SAEConfig = sae.cfg
    W, b = sae.encoder_affine()
    d, n, k = int(W.shape[1]), int(W.shape[0]), int(cfg.k)
    p = sae.priority_latents
    # The main GEMM covers latents p..n-1 (all of them for a plain SAE); priority latents get their own small one.
    w_t = W[p:].detach().to("cpu", torch.float32).T.contiguous().numpy()  # [d, n - p]: pre = x @ w_t + b
    bias = b[p:].detach().to("cpu", torch.float32).contiguous().numpy()
    inits = [numpy_helper.from_array(w_t, "W_enc_folded_T"),
             numpy_helper.from_array(bias, "b_enc_folded"),
             helper.make_tensor("k", TensorProto.INT64, [1], [k]),
             helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
             helper.make_tensor("empty_index", TensorProto.INT64, [], [-1])]
    nodes = [
        helper.make_node("MatMul", [INPUT_NAME, "W_enc_folded_T"], ["xw"], name="encoder_gemm"),
        helper.make_node("Add", ["xw", "b_enc_folded"], ["pre"], name="encoder_bias"),
        helper.make_node("Relu", ["pre"], ["act"], name="relu"),
    ]
    if p:
        nodes += _priority_topk_nodes(W[:p], b[:p], k, opset, inits)
    else:
        nodes.append(helper.make_node("TopK", ["act", "k"], [OUTPUT_VALUES, "topk_indices"], name="topk", axis=-1,
                                      largest=1, sorted=1))
    nodes += [
        helper.make_node("Greater", [OUTPUT_VALUES, "zero"], ["nonzero"], name="is_nonzero"),
        helper.make_node("Where", ["nonzero", "topk_indices", "empty_index"], [OUTPUT_INDICES],
                         name="empty_slots_to_minus_one"),
    ]
    graph = helper.make_graph(
        nodes, "protsae_sae_encoder",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["rows", d])],
        [helper.make_tensor_value_info(OUTPUT_INDICES, TensorProto.INT64, ["rows", k]),
         helper.make_tensor_value_info(OUTPUT_VALUES, TensorProto.FLOAT, ["rows", k])],
        initializer=inits,
        doc_string=f"TopK_{k}(ReLU(x @ W^T + b)) of a protsae SAE ({cfg.arch}, d_model={d}, d_sae={n}); "
                   + (f"positive latents 0..{p - 1} admitted first; " if p else "")
                   + "values descending, ties to the lower latent index, empty slots idx -1 / value 0.")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="protsae",
                              producer_version=__version__,
                              doc_string="protsae SAE encoder; config in metadata_props['protsae_config']")
    # Keep the IR version at what the opset needs so that older onnxruntime releases load the file.
    model.ir_version = min(model.ir_version, _ir_version_for(opset))
    helper.set_model_props(model, {
        META_FORMAT: ONNX_FORMAT,
        META_CONFIG: json.dumps(cfg.to_json_dict(), sort_keys=False),
        META_SHA: sae_sha256 or state_sha256(sae),
        "protsae_d_model": str(d), "protsae_d_sae": str(n), "protsae_k": str(k),
        "protsae_hook": f"{cfg.hook_point}@{cfg.layer}", "protsae_plm": cfg.plm_name,
    })
    if w_t.nbytes < _EXTERNAL_DATA_BYTES:  # the checker serialises the model: impossible past 2 GiB
        onnx.checker.check_model(model)
    return model


def _priority_topk_nodes(W_pri: torch.Tensor, b_pri: torch.Tensor, k: int, opset: int, inits: list) -> list:
    """Nodes from `act` (latents p..n-1) to (OUTPUT_VALUES, "topk_indices") for `sae.priority_topk_relu`, as the
    Triton backend does it (`encode.merge_priority`): the plain top-k of the other latents, the p priority latents
    from their own small GEMM, and the priority selection over those p + k candidates only, so no extra
    [rows, d_sae] tensor is materialised. The selected candidates are re-sorted by value (a second TopK over k
    entries) to keep the reference order."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    p = int(W_pri.shape[0])
    inits += [numpy_helper.from_array(W_pri.detach().to("cpu", torch.float32).T.contiguous().numpy(), "W_pri_folded_T"),
              numpy_helper.from_array(b_pri.detach().to("cpu", torch.float32).contiguous().numpy(), "b_pri_folded"),
              numpy_helper.from_array(np.arange(p, dtype=np.int64)[None, :], "priority_index_row"),
              numpy_helper.from_array(np.arange(p + k) < p, "is_priority_candidate"),
              helper.make_tensor("n_priority", TensorProto.INT64, [], [p]),
              helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])]
    if opset >= 18:  # ReduceMax takes its axes as an input from opset 18 on
        inits.append(helper.make_tensor("last_axis", TensorProto.INT64, [1], [-1]))
        rmax = helper.make_node("ReduceMax", ["cand_values", "last_axis"], ["row_max"], name="row_max", keepdims=1)
    else:
        rmax = helper.make_node("ReduceMax", ["cand_values"], ["row_max"], name="row_max", axes=[-1], keepdims=1)
    return [
        helper.make_node("TopK", ["act", "k"], ["free_values", "free_top"], name="topk_free", axis=-1, largest=1,
                         sorted=1),
        helper.make_node("Add", ["free_top", "n_priority"], ["free_indices"], name="free_indices"),
        helper.make_node("MatMul", [INPUT_NAME, "W_pri_folded_T"], ["xw_pri"], name="priority_gemm"),
        helper.make_node("Add", ["xw_pri", "b_pri_folded"], ["pre_pri"], name="priority_bias"),
        helper.make_node("Relu", ["pre_pri"], ["act_pri"], name="priority_relu"),
        helper.make_node("Shape", ["act_pri"], ["pri_shape"], name="priority_shape"),
        helper.make_node("Expand", ["priority_index_row", "pri_shape"], ["pri_indices"], name="priority_indices"),
        helper.make_node("Concat", ["act_pri", "free_values"], ["cand_values"], name="candidates", axis=-1),
        helper.make_node("Concat", ["pri_indices", "free_indices"], ["cand_indices"], name="candidate_indices",
                         axis=-1),
        rmax,
        helper.make_node("Add", ["row_max", "one"], ["lift"], name="lift"),
        helper.make_node("Greater", ["cand_values", "zero"], ["cand_positive"], name="candidate_positive"),
        helper.make_node("And", ["cand_positive", "is_priority_candidate"], ["lifted"], name="priority_and_positive"),
        helper.make_node("Add", ["cand_values", "lift"], ["cand_lifted"], name="candidate_plus_lift"),
        helper.make_node("Where", ["lifted", "cand_lifted", "cand_values"], ["key"], name="priority_key"),
        helper.make_node("TopK", ["key", "k"], ["key_top", "selected"], name="topk_by_key", axis=-1, largest=1,
                         sorted=1),
        helper.make_node("GatherElements", ["cand_values", "selected"], ["selected_values"], name="selected_values",
                         axis=-1),
        helper.make_node("TopK", ["selected_values", "k"], [OUTPUT_VALUES, "order"], name="sort_by_value",
                         axis=-1, largest=1, sorted=1),
        helper.make_node("GatherElements", ["selected", "order"], ["selected_sorted"], name="selected_sorted",
                         axis=-1),
        helper.make_node("GatherElements", ["cand_indices", "selected_sorted"], ["topk_indices"],
                         name="topk_indices", axis=-1),
    ]


def _ir_version_for(opset: int) -> int:
    from onnx import helper

    table = getattr(helper, "VERSION_TABLE", [])
    for _release, ir, op, *_ in table:
        if op == opset:
            return int(ir)
    import onnx

    return int(onnx.IR_VERSION)


def export_onnx(sae, path: str | os.PathLike, opset: int = 17, sae_sha256: str | None = None) -> Path:
    """Write the encoder to `path` atomically (temp files in the same directory, then rename).

    Encoders over ~1.8 GB of fp32 weights are written with ONNX external data as `<name>.data` beside it.
    `sae_sha256` is recorded as given (the checkpoint file's digest, as `load_sae` returns it); without it,
    `state_sha256(sae)` is recorded.
    """
    import onnx

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = build_onnx_model(sae, opset=opset, sae_sha256=sae_sha256)
    external = sum(t.ByteSize() for t in model.graph.initializer) >= _EXTERNAL_DATA_BYTES
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        tmp_model = tmpdir / out.name
        if external:
            data_name = out.name + ".data"
            onnx.save_model(model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            os.replace(tmpdir / data_name, out.parent / data_name)
        else:
            onnx.save_model(model, str(tmp_model))
        os.replace(tmp_model, out)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return out


def export_onnx_from_dir(sae_path: str | os.PathLike, out: str | os.PathLike,
                         opset: int = 17) -> tuple[Path, SAEConfig]:
    """Load an SAE checkpoint (directory or .safetensors) and export it; records the weights file's sha256."""
    from protsae_cli.sae.checkpoint import load_sae

    sae, sha = load_sae(sae_path, device="cpu")
    return export_onnx(sae, out, opset=opset, sae_sha256=sha), sae.cfg


def load_onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The model's metadata_props (weights are not loaded)."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise InputError(f"ONNX file not found: {p}")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf decode errors have no common type
        raise InputError(f"{p}: not an ONNX model ({e})") from e
    return {prop.key: prop.value for prop in model.metadata_props}


def load_onnx_config(path: str | os.PathLike) -> SAEConfig:
    """The SAE config embedded by `export_onnx`, to check the file against a PLM (`check_compatible`)."""
    meta = load_onnx_metadata(path)
    if meta.get(META_FORMAT) != ONNX_FORMAT or META_CONFIG not in meta:
        raise InputError(f"{path}: not a protsae SAE encoder export (no '{META_CONFIG}' metadata)")
    try:
        d: dict[str, Any] = json.loads(meta[META_CONFIG])
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: embedded SAE config is not valid JSON ({e})") from e
    return SAEConfig.from_json_dict(d, where=f"{path} (metadata '{META_CONFIG}')")
