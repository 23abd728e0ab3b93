"""The hooked forward must equal fair-esm's own forward: identity checks and the identity splice."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protsae_cli.errors import InputError
from protsae_cli.plm.esm_forward import EsmRunner, HookPoint, Tokenizer

SEQS = ["MKTAYIAKQRQISFVKSHFSRQ", "MKV", "ACDEFGHIKLMNPQRSTVWYXBUZO", "W"]


def _tokens(plm, seqs):
    _, _, t = plm.alphabet.get_batch_converter()([(str(i), s) for i, s in enumerate(seqs)])
    return t


def test_tokenizer_matches_fair_esm_batch_converter(tiny_plm):
    assert torch.equal(Tokenizer(tiny_plm.alphabet).batch(SEQS), _tokens(tiny_plm, SEQS))


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_resid_post_equals_fair_esm_repr_layers(tiny_plm, layer):
    tok = _tokens(tiny_plm, SEQS)
    ref = tiny_plm.model(tok, repr_layers=[layer])["representations"][layer]
    got = EsmRunner(tiny_plm, attention="reference").hook_activations(tok, HookPoint("resid_post", layer))
    real = tok.ne(tiny_plm.alphabet.padding_idx)
    assert torch.equal(got[real], ref[real])  # bit-identical, last layer (with final layer norm) included
    sdpa = EsmRunner(tiny_plm, attention="sdpa").hook_activations(tok, HookPoint("resid_post", layer))
    torch.testing.assert_close(sdpa[real], ref[real], rtol=1e-4, atol=1e-5)


def test_attn_out_is_mid_block_residual(tiny_plm):
    """attn_out@L = block input + attention output, checked with a forward hook on fair-esm's own module."""
    tok = _tokens(tiny_plm, SEQS)
    seen = {}
    layer = tiny_plm.model.layers[1]
    h1 = layer.register_forward_pre_hook(lambda m, args, kwargs: seen.__setitem__("in", args[0]), with_kwargs=True)
    h2 = layer.self_attn.register_forward_hook(lambda m, args, out: seen.__setitem__("attn", out[0]))
    try:
        tiny_plm.model(tok)
    finally:
        h1.remove()
        h2.remove()
    expect = (seen["in"] + seen["attn"]).transpose(0, 1)
    got = EsmRunner(tiny_plm, attention="reference").hook_activations(tok, HookPoint("attn_out", 2))
    real = tok.ne(tiny_plm.alphabet.padding_idx)
    assert torch.equal(got[real], expect[real])


@pytest.mark.parametrize("hook", [HookPoint("resid_post", 1), HookPoint("attn_out", 3), HookPoint("resid_post", 3)])
def test_identity_splice_reproduces_logits_exactly(tiny_plm, hook):
    tok = _tokens(tiny_plm, SEQS)
    ref = tiny_plm.model(tok)["logits"]
    got = EsmRunner(tiny_plm, attention="reference").logits(tok, hook, edit=lambda x: x.clone())
    assert torch.equal(got, ref)


def test_edit_changes_downstream_logits(tiny_plm):
    tok = _tokens(tiny_plm, SEQS)
    r = EsmRunner(tiny_plm, attention="reference")
    base = r.logits(tok)
    edited = r.logits(tok, HookPoint("resid_post", 1), edit=lambda x: x + 1.0)
    assert not torch.allclose(base, edited)


def test_hook_past_last_layer_is_an_error(tiny_plm):
    with pytest.raises(InputError, match="past the last layer"):
        EsmRunner(tiny_plm).hook_activations(_tokens(tiny_plm, ["MK"]), HookPoint("resid_post", 9))
    with pytest.raises(InputError):
        HookPoint("mlp_out", 1)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.text("ACDEFGHIKLMNPQRSTVWY", min_size=1, max_size=40), min_size=1, max_size=4))
def test_batching_does_not_change_activations_beyond_tolerance(tiny_plm, seqs):
    """A protein's activations must not depend on what it is batched with (padding is masked)."""
    r = EsmRunner(tiny_plm, attention="sdpa")
    hook = HookPoint("resid_post", 2)
    together = r.hook_activations(r.tokenizer.batch(seqs), hook)
    for i, s in enumerate(seqs):
        alone = r.hook_activations(r.tokenizer.batch([s]), hook)
        torch.testing.assert_close(together[i, 1:len(s) + 1], alone[0, 1:len(s) + 1], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("point", ["resid_post", "attn_out"])
def test_cuda_bf16_sdpa_matches_fp32_reference_within_bf16_tolerance(tiny_esm_path, point):
    from protsae_cli.plm.loading import load_plm

    seqs = ["MKTAYIAKQRQISFVKSHFSRQ" * 5, "MKV", "ACDEFGHIKLMNPQRSTVWYXBUZO" * 3]
    cpu = load_plm(str(tiny_esm_path))
    ref = EsmRunner(cpu, attention="reference").hook_activations(_tokens(cpu, seqs), HookPoint(point, 2))
    gpu = EsmRunner(load_plm(str(tiny_esm_path), "cuda"), device="cuda")  # sdpa + bf16 autocast by default
    got = gpu.hook_activations(_tokens(cpu, seqs), HookPoint(point, 2)).cpu()
    real = _tokens(cpu, seqs).ne(cpu.alphabet.padding_idx)
    err = (got[real] - ref[real]).norm() / ref[real].norm()
    assert err < 2e-2, err
