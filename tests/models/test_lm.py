"""MambaLMHeadModel: logits, loss, packing, cache, checkpointing, tying, vocab padding, init, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from mamba_pkg.generation.cache import InferenceParams
from mamba_pkg.models.config import MambaConfig
from mamba_pkg.models.lm import MambaLMHeadModel, fused_lm_head_loss, shifted_cross_entropy

MAMBA2 = {"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 8}
ATTN = {"num_heads": 4, "num_heads_kv": 2, "rotary_emb_dim": 4, "d_conv": 3}


def _config(**kw):
    base = dict(d_model=32, n_layer=3, vocab_size=50, pad_vocab_size_multiple=16, ssm_cfg=dict(MAMBA2))
    base.update(kw)
    return MambaConfig(**base)


def _model(**kw):
    torch.manual_seed(0)
    return MambaLMHeadModel(_config(**kw))


def test_logits_shape_vocab_padding_and_names():
    model = _model(d_intermediate=24, attn_layer_idx=[1], attn_cfg=dict(ATTN))
    ids = torch.randint(0, 50, (2, 7))
    out = model(ids)
    assert out.logits.shape == (2, 7, 64) and out.loss is None
    assert model.backbone.embedding.weight.shape == (64, 32)
    keys = set(model.state_dict())
    for key in (
        "backbone.embedding.weight",
        "backbone.layers.0.norm.weight",
        "backbone.layers.0.mixer.in_proj.weight",
        "backbone.layers.0.mixer.A_log",
        "backbone.layers.0.norm2.weight",
        "backbone.layers.0.mlp.fc1.weight",
        "backbone.layers.1.mixer.conv1d.weight",
        "backbone.norm_f.weight",
        "lm_head.weight",
    ):
        assert key in keys, key
    assert model(ids, num_last_tokens=2).logits.shape == (2, 2, 64)
    assert torch.allclose(model(ids, num_last_tokens=2).logits, out.logits[:, -2:], atol=1e-6)


def test_loss_matches_manual_shifted_cross_entropy():
    model = _model()
    ids = torch.randint(0, 50, (2, 9))
    labels = ids.clone()
    labels[0, 4] = -100
    out = model(ids, labels=labels)
    manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, manual, atol=1e-6)
    assert out.loss.dtype == torch.float32


def test_tied_and_untied_embeddings():
    """Tied: one tensor, whose grad is the sum of the embedding's and the head's grads when untied."""
    tied = _model()
    assert tied.lm_head.weight is tied.backbone.embedding.weight
    untied = _model(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.backbone.embedding.weight
    untied.load_state_dict(tied.state_dict())
    ids = torch.randint(0, 50, (1, 5))
    tied(ids, labels=ids).loss.backward()
    untied(ids, labels=ids).loss.backward()
    summed = untied.backbone.embedding.weight.grad + untied.lm_head.weight.grad
    assert torch.allclose(tied.backbone.embedding.weight.grad, summed, atol=1e-6)
    assert untied.backbone.embedding.weight.grad[50:].abs().sum() == 0  # padding ids are never looked up


def test_init_rescales_residual_projections():
    model = _model(n_layer=4, d_intermediate=24)
    emb = model.backbone.embedding.weight
    assert abs(emb.std().item() - 0.02) < 0.005
    layer = model.backbone.layers[0]
    for w, fan_in in ((layer.mixer.out_proj.weight, 64), (layer.mlp.fc2.weight, layer.mlp.fc2.in_features)):
        bound = 1 / math.sqrt(fan_in) / math.sqrt(2 * 4)  # kaiming_uniform(a=sqrt(5)) bound, / sqrt(n_residuals * n_layer)
        assert w.abs().max() <= bound + 1e-7 and w.abs().max() > 0.5 * bound
    assert (layer.mixer.dt_bias != 0).all()


@pytest.mark.parametrize("attn", [False, True])
def test_packed_equals_per_sequence(attn):
    kw = dict(d_intermediate=24, attn_layer_idx=[1], attn_cfg=dict(ATTN)) if attn else {}
    model = _model(**kw)
    lengths = [5, 1, 8]
    seqs = [torch.randint(0, 50, (1, n)) for n in lengths]
    cu = torch.tensor([0, 5, 6, 14], dtype=torch.int32)
    ids = torch.cat(seqs, dim=1)
    packed = model(ids, labels=ids, cu_seqlens=cu)
    total, count = 0.0, 0
    for s, seq in enumerate(seqs):
        alone = model(seq, labels=seq)
        assert torch.allclose(packed.logits[:, cu[s] : cu[s + 1]], alone.logits, atol=1e-5)
        if seq.shape[1] > 1:
            total += alone.loss.item() * (seq.shape[1] - 1)
            count += seq.shape[1] - 1
    assert abs(packed.loss.item() - total / count) < 1e-5


@pytest.mark.parametrize("attn", [False, True])
@torch.no_grad()
def test_prefill_then_steps_equal_forward(attn):
    kw = dict(attn_layer_idx=[0, 2], attn_cfg=dict(ATTN)) if attn else {}
    model = _model(**kw)
    ids = torch.randint(0, 50, (2, 10))
    full = model(ids).logits
    params = InferenceParams(max_seqlen=10, max_batch_size=2)
    params.key_value_memory_dict = model.allocate_inference_cache(2, 10)
    outs = [model(ids[:, :6], inference_params=params).logits]
    for t in range(6, 10):
        params.seqlen_offset = t
        outs.append(model(ids[:, t : t + 1], inference_params=params).logits)
    assert torch.allclose(torch.cat(outs, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_gradient_checkpointing_gives_same_grads(packed):
    model = _model(d_intermediate=24, attn_layer_idx=[1], attn_cfg=dict(ATTN))
    ids = torch.randint(0, 50, (1, 8) if packed else (2, 8))
    cu = torch.tensor([0, 3, 8], dtype=torch.int32) if packed else None

    def grads():
        model.zero_grad()
        model(ids, labels=ids, cu_seqlens=cu).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.gradient_checkpointing_enable()
    assert model.backbone.gradient_checkpointing
    ckpt = grads()
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-6), name


def test_unfused_norm_paths_match_fused():
    fused = _model(d_intermediate=24)
    unfused = MambaLMHeadModel(_config(d_intermediate=24, fused_add_norm=False))
    unfused.load_state_dict(fused.state_dict())
    ids = torch.randint(0, 50, (1, 6))
    assert torch.allclose(fused(ids).logits, unfused(ids).logits, atol=1e-5)
    layernorm = MambaLMHeadModel(_config(rms_norm=False))
    assert "backbone.norm_f.bias" in layernorm.state_dict()
    assert torch.isfinite(layernorm(ids).logits).all()


def test_bad_inputs():
    model = _model(n_layer=1)
    ids = torch.randint(0, 50, (2, 6))
    with pytest.raises(ValueError, match="input_ids must have 2 dimensions"):
        model(ids[0])
    with pytest.raises(TypeError, match="input_ids must have dtype"):
        model(ids.float())
    with pytest.raises(ValueError, match="labels must have shape"):
        model(ids, labels=ids[:, :5])
    with pytest.raises(ValueError, match="num_last_tokens"):
        model(ids, labels=ids, num_last_tokens=1)
    with pytest.raises(ValueError, match="return_logits=False needs labels"):
        model(ids, return_logits=False)
    with pytest.raises(ValueError, match="end at the sequence length"):
        model(ids[:1], cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="batch size 1"):
        model(ids, cu_seqlens=torch.tensor([0, 6], dtype=torch.int32))
    with pytest.raises(TypeError, match="MambaConfig"):
        MambaLMHeadModel({"d_model": 16})
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MambaLMHeadModel(_config(attn_layer_idx=[0], attn_cfg={"num_heads": 5}))


def test_bf16_model_close_to_fp32():
    model = _model(d_intermediate=24, attn_layer_idx=[1], attn_cfg=dict(ATTN))
    ids = torch.randint(0, 50, (2, 9))
    ref = model(ids).logits
    model.to(torch.bfloat16)
    out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert ((out.logits.float() - ref).norm() / ref.norm()).item() < 3e-2


def test_delegating_methods(monkeypatch):
    """generate / save_pretrained / from_pretrained hand their arguments to the owning modules."""
    import mamba_pkg.generation.decode as decode
    import mamba_pkg.models.checkpoint as checkpoint

    calls = {}
    monkeypatch.setattr(decode, "generate", lambda model, ids, *a, **kw: calls.setdefault("generate", (model, ids, a, kw)))
    monkeypatch.setattr(checkpoint, "save_pretrained", lambda model, d, **kw: calls.setdefault("save", (model, d, kw)))
    monkeypatch.setattr(checkpoint, "load_pretrained", lambda cls, name, **kw: calls.setdefault("load", (cls, name, kw)))
    model = _model(n_layer=1)
    ids = torch.zeros(1, 3, dtype=torch.long)
    model.generate(ids, 20, top_k=1)
    model.save_pretrained("somewhere", max_shard_size="1GB")
    MambaLMHeadModel.from_pretrained("org/name", dtype=torch.float16)
    assert calls["generate"] == (model, ids, (20,), {"top_k": 1})
    assert calls["save"] == (model, "somewhere", {"max_shard_size": "1GB"})
    assert calls["load"] == (MambaLMHeadModel, "org/name", {"dtype": torch.float16})


def test_inference_params_reset():
    model = _model(n_layer=2, attn_layer_idx=[1], attn_cfg=dict(ATTN))
    params = InferenceParams(max_seqlen=6, max_batch_size=1, lengths_per_sample=torch.zeros(1, dtype=torch.int32))
    ids = torch.randint(0, 50, (1, 4))
    with torch.no_grad():
        first = model(ids, inference_params=params).logits
        params.seqlen_offset = 4
        params.lengths_per_sample += 4
        model(ids[:, :1], inference_params=params)
        params.reset(6, 1)
        assert params.seqlen_offset == 0 and params.lengths_per_sample.item() == 0
        again = model(ids, inference_params=params).logits  # a fresh prefill overwrites the old states
    assert torch.allclose(first, again, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (the fp32-accumulating products)"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_fused_lm_head_loss_equals_unfused(dtype, packed, device):
    """Loss and gradients of the chunked lm_head + cross entropy equal logits -> shifted_cross_entropy
    (chunks of 3 and 10 rows: not dividing the 2 x 37 tokens; ignored labels; packed boundaries)."""
    batch = 1 if packed else 2
    cu_seqlens = torch.tensor([0, 10, 11, 37], dtype=torch.int32, device=device) if packed else None
    hidden = torch.randn(batch, 37, 16).to(device, dtype).requires_grad_()
    weight = torch.randn(61, 16).to(device, dtype).requires_grad_()
    labels = torch.randint(0, 61, (batch, 37)).to(device)
    labels[0, 5] = -100
    ref = shifted_cross_entropy(F.linear(hidden, weight), labels, cu_seqlens)
    ref_grads = torch.autograd.grad(2.5 * ref, (hidden, weight))
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    for rows in (3, 10):
        loss = fused_lm_head_loss(hidden, weight, labels, cu_seqlens, chunk_elems=61 * rows)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
        for got, exp in zip(torch.autograd.grad(2.5 * loss, (hidden, weight)), ref_grads):
            assert got.dtype == dtype
            torch.testing.assert_close(got, exp, **tol)
        with torch.no_grad():
            torch.testing.assert_close(fused_lm_head_loss(hidden, weight, labels, cu_seqlens, chunk_elems=61 * rows), ref,
                                       rtol=1e-5, atol=1e-5)


def test_fused_loss_op_opcheck_and_compiled_graph_keeps_it_opaque():
    """The chunk loop is one custom op (torch.compile must not unroll it: the chunks' (rows, V)
    intermediates would then be scheduled together); its fake implementation matches."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    hidden, weight = torch.randn(23, 16), torch.randn(61, 16)
    targets = torch.randint(0, 61, (23,))
    targets[4] = -100
    torch.library.opcheck(torch.ops.mamba_pkg.lm_head_loss_grads, (hidden, weight, targets, 5))
    backend = AotEagerAndRecordGraphs()
    hidden.requires_grad_()
    labels = torch.randint(0, 61, (1, 23))
    loss = torch.compile(fused_lm_head_loss, backend=backend, fullgraph=True)(hidden[None], weight, labels,
                                                                                chunk_elems=61 * 5)
    torch.testing.assert_close(loss, fused_lm_head_loss(hidden[None], weight, labels, chunk_elems=61 * 5))
    forward = "\n".join(g.code for g in backend.fw_graphs)
    assert forward.count("mamba_pkg.lm_head_loss_grads") == 1 and "log_softmax" not in forward


def test_model_return_logits_false_gives_the_same_loss_and_grads():
    model = _model(d_intermediate=24, attn_layer_idx=[1], attn_cfg=dict(ATTN))
    ids = torch.randint(0, 50, (2, 9))
    runs = []
    for return_logits in (True, False):
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids, return_logits=return_logits)
        out.loss.backward()
        runs.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (full, grads_full), (fused, grads_fused) = runs
    assert fused.logits is None and full.logits.shape == (2, 9, 64)
    torch.testing.assert_close(fused.loss, full.loss, rtol=1e-6, atol=1e-6)
    for name, grad in grads_full.items():
        torch.testing.assert_close(grads_fused[name], grad, rtol=1e-4, atol=1e-6)
