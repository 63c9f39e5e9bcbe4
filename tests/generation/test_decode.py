"""generate(): step-by-step decode equals the full forward; padded / varlen batches equal
one-by-one runs; per-sequence EOS; teacher forcing; seeding; errors; CUDA graph == eager."""

import pytest
import torch

from mamba_pkg.generation import decode as dec
from mamba_pkg.generation.decode import DecodeGraph, GenerateOutput, decode, free_decode_graphs, generate
from mamba_pkg.models.config import MambaConfig
from mamba_pkg.models.lm import MambaLMHeadModel
from mamba_pkg.ops import decode_linear as dl

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VOCAB = 37
KINDS = {
    "mamba1": dict(ssm_cfg={"layer": "Mamba1", "d_state": 4}),
    "mamba2": dict(ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 8}),
    "hybrid": dict(
        ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 8},
        attn_layer_idx=[1],
        attn_cfg={"num_heads": 2, "rotary_emb_dim": 4},
    ),
}


def make_model(kind, device="cpu", dtype=torch.float32, n_layer=3, d_model=16):
    torch.manual_seed(1)
    config = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB, **KINDS[kind])
    model = MambaLMHeadModel(config, device=device, dtype=dtype).eval()
    # Larger-than-init weights so that logits differ clearly between tokens (greedy ties are rare).
    with torch.no_grad():
        model.backbone.embedding.weight.mul_(20)
    return model


@pytest.fixture(scope="module", params=list(KINDS))
def kind_model(request):
    return request.param, make_model(request.param)


def full_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits[..., :VOCAB].float()


def test_step_logits_equal_full_forward(kind_model):
    _, model = kind_model
    ids = torch.randint(0, VOCAB, (2, 7))
    out = generate(model, ids, max_new_tokens=6, return_dict_in_generate=True, output_scores=True)
    assert isinstance(out, GenerateOutput)
    assert out.sequences.shape == (2, 13)
    assert torch.equal(out.sequences[:, :7], ids)
    scores = torch.stack(out.scores, dim=1)  # (B, T, V)
    ref = full_logits(model, out.sequences)[:, 6:-1]
    torch.testing.assert_close(scores, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(out.sequences[:, 7:], scores.argmax(-1))  # greedy by default


@pytest.mark.parametrize("prefill_chunk_size", [4096, 4])
def test_bf16_ssm_state_option(kind_model, prefill_chunk_size):
    """ssm_state_dtype=bf16 keeps the SSM states in bf16 (the chunked prefill continues from
    them) and stays close to the fp32-state logits."""
    kind, model = kind_model
    ids = torch.randint(0, VOCAB, (2, 9))
    ref = generate(model, ids, max_new_tokens=5, return_dict_in_generate=True, output_scores=True)
    out = generate(model, ids, max_new_tokens=5, return_dict_in_generate=True, output_scores=True,
                   teacher_outputs=ref.sequences, ssm_state_dtype=torch.bfloat16,
                   prefill_chunk_size=prefill_chunk_size)
    scores, ref_scores = torch.stack(out.scores), torch.stack(ref.scores)
    assert (scores - ref_scores).abs().max() <= 0.05 * ref_scores.abs().max()
    cache = model.allocate_inference_cache(2, 16, ssm_state_dtype=torch.bfloat16)
    ssm_states = [entry[1] for i, entry in cache.items() if i not in KINDS[kind].get("attn_layer_idx", [])]
    assert ssm_states and all(s.dtype == torch.bfloat16 for s in ssm_states)


def test_chunked_prefill_equals_one_call(kind_model):
    _, model = kind_model
    ids = torch.randint(0, VOCAB, (2, 11))
    a = generate(model, ids, max_new_tokens=4, return_dict_in_generate=True, output_scores=True)
    b = generate(model, ids, max_new_tokens=4, return_dict_in_generate=True, output_scores=True, prefill_chunk_size=4)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(torch.stack(a.scores), torch.stack(b.scores), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prefill_chunk_size", [4096, 3], ids=["varlen", "grouped-chunked"])
def test_left_padded_batch_equals_one_by_one(kind_model, prefill_chunk_size):
    _, model = kind_model
    lengths = [5, 1, 9, 5]
    # max_seqlen 14 is below the packed length 20: the KV cache only has to hold the longest prompt.
    width, new = max(lengths), 5
    prompts = [torch.randint(0, VOCAB, (n,)) for n in lengths]
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    out = generate(model, ids, max_new_tokens=new, attention_mask=mask, return_dict_in_generate=True,
                   output_scores=True, prefill_chunk_size=prefill_chunk_size)
    assert torch.equal(out.sequences[:, :width], ids)
    for i, p in enumerate(prompts):
        alone = generate(model, p[None], max_new_tokens=new, return_dict_in_generate=True, output_scores=True)
        assert torch.equal(out.sequences[i, width:], alone.sequences[0, len(p):]), f"row {i}"
        torch.testing.assert_close(
            torch.stack([s[i] for s in out.scores]), torch.stack([s[0] for s in alone.scores]), rtol=1e-4, atol=1e-4
        )


def test_greedy_blocks_equal_step_by_step(kind_model):
    """Plain greedy decoding runs GRAPH_STEPS steps per block (eagerly here): the same tokens as the
    token-by-token loop (taken with output_scores), over two blocks and a remainder."""
    _, model = kind_model
    ids = torch.randint(0, VOCAB, (2, 5))
    new = 2 * dec.GRAPH_STEPS + 3
    blocks = generate(model, ids, max_new_tokens=new)
    steps = generate(model, ids, max_new_tokens=new, return_dict_in_generate=True, output_scores=True)
    assert blocks.shape == (2, 5 + new)
    assert torch.equal(blocks, steps.sequences)
    assert torch.equal(blocks[:, 5:], torch.stack(steps.scores, dim=1).argmax(-1))


def test_greedy_eos_equals_step_by_step():
    """Greedy decoding with EOS ids (the block path: EOS bookkeeping on the device) gives the
    same sequences and length as the token-by-token loop (taken with output_scores)."""
    model = make_model("mamba2")
    ids = torch.randint(0, VOCAB, (3, 4))
    free = generate(model, ids, max_new_tokens=20)[:, 4:]
    for eos in (int(free[0, 3]), [int(free[1, 5]), int(free[2, 1])], VOCAB - 1):
        fast = generate(model, ids, max_new_tokens=20, eos_token_id=eos, pad_token_id=VOCAB - 2)
        slow = generate(model, ids, max_new_tokens=20, eos_token_id=eos, pad_token_id=VOCAB - 2,
                        return_dict_in_generate=True, output_scores=True)
        assert torch.equal(fast, slow.sequences)


class _EagerGraph:
    """DecodeGraph's replay interface run eagerly on CPU: what the captured graphs do, so that
    _greedy_decode's bookkeeping around them (blocks, remainder, EOS state) is tested here."""

    def __init__(self, model, batch, max_seqlen):
        self.model = model
        self.params = dec._new_cache(model, batch, max_seqlen, torch.float32)
        self.params.lengths_per_sample = torch.zeros(batch, dtype=torch.int32)
        self.tokens = torch.zeros(batch, dtype=torch.long)
        self.block_tokens = torch.zeros(batch, dec.GRAPH_STEPS, dtype=torch.long)
        self.finished, self.live = torch.zeros(batch, dtype=torch.bool), torch.zeros((), dtype=torch.long)
        self.pad, self.eos = torch.zeros((), dtype=torch.long), {}
        self.blocks, self.replays = {}, 0

    stop_state = DecodeGraph.stop_state

    def greedy_block(self, model, tokens, steps, stop=None):
        assert steps <= dec.GRAPH_STEPS and steps & (steps - 1) == 0
        self.tokens.copy_(tokens)
        offset = self.params.seqlen_offset
        dec._greedy_steps(model, self.tokens, self.params, VOCAB, self.block_tokens[:, :steps], stop)
        self.params.seqlen_offset = offset
        self.replays += 1
        return self.block_tokens[:, :steps]


@pytest.mark.parametrize("eos", [None, "mid", "many"])
def test_greedy_decode_graph_bookkeeping(eos):
    """_greedy_decode's graph branch (GRAPH_STEPS per block, then single steps, EOS state in the
    graph's buffers) against the eager generate, with the replays done eagerly."""
    model = make_model("mamba1")
    ids = torch.randint(0, VOCAB, (2, 5))
    new = 2 * dec.GRAPH_STEPS + 7  # the first token, two full blocks, then blocks of 4, 2
    free = generate(model, ids, max_new_tokens=new)
    eos_ids = {None: None, "mid": int(free[0, 5 + dec.GRAPH_STEPS + 2]), "many": list(range(VOCAB - 13, VOCAB))}[eos]
    ref = generate(model, ids, max_new_tokens=new, eos_token_id=eos_ids)
    fake = _EagerGraph(model, 2, 5 + new)
    eos_t = dec._eos_ids(eos_ids, torch.device("cpu"))
    pad = int(eos_t[0]) if eos_t is not None else 0
    lengths = torch.full((2,), 5)
    logits = dec._prefill(model, ids, torch.ones_like(ids, dtype=torch.bool), fake.params, lengths, VOCAB,
                          torch.float32, 4096)
    fake.params.lengths_per_sample.copy_(lengths)
    seq = torch.full((2, 5 + new), pad, dtype=torch.long)
    seq[:, :5] = ids
    n = dec._greedy_decode(model, fake, fake.params, logits, seq, 5, new, VOCAB, eos_t, pad)
    assert n == ref.shape[1] - 5
    assert torch.equal(seq[:, : 5 + n], ref)
    if eos is None:
        assert fake.replays == 4


def test_per_sequence_eos():
    model = make_model("mamba1")
    ids = torch.randint(0, VOCAB, (3, 4))
    free = generate(model, ids, max_new_tokens=8)[:, 4:]
    eos = int(free[0, 2])  # row 0 emits it at step 2 (or earlier)
    out = generate(model, ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=VOCAB - 1)
    new = out[:, 4:]
    for row in range(3):
        hits = (free[row] == eos).nonzero()
        if len(hits) == 0:
            assert torch.equal(new[row], free[row, : new.shape[1]])
            continue
        stop = int(hits[0])
        assert torch.equal(new[row, : stop + 1], free[row, : stop + 1])
        assert (new[row, stop + 1:] == VOCAB - 1).all()
    # every row finished: the loop stops at the last row's EOS
    stops = [int((free[r] == eos).nonzero()[0]) if (free[r] == eos).any() else 7 for r in range(3)]
    assert new.shape[1] == max(stops) + 1


def test_all_rows_eos_stops_early():
    model = make_model("mamba1")
    ids = torch.randint(0, VOCAB, (1, 4))
    first = int(generate(model, ids, max_new_tokens=1)[0, -1])
    out = generate(model, ids, max_new_tokens=20, eos_token_id=[VOCAB - 2, first])
    assert out.shape == (1, 5)


def test_teacher_forcing():
    model = make_model("mamba2")
    teacher = torch.randint(0, VOCAB, (2, 12))
    out = generate(model, teacher[:, :5], max_length=12, teacher_outputs=teacher, return_dict_in_generate=True,
                   output_scores=True)
    assert torch.equal(out.sequences, teacher)
    torch.testing.assert_close(torch.stack(out.scores, 1), full_logits(model, teacher)[:, 4:-1], rtol=1e-4, atol=1e-4)


def test_repetition_penalty_matches_a_manual_loop():
    """Greedy with a penalty equals: full forward, penalise the row's real tokens so far, argmax."""
    from mamba_pkg.generation.sampling import apply_repetition_penalty

    model = make_model("mamba1")
    ids = torch.randint(0, VOCAB, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    out = generate(model, ids, max_new_tokens=6, attention_mask=mask, repetition_penalty=3.0)
    plain = generate(model, ids, max_new_tokens=6, attention_mask=mask)
    assert not torch.equal(out, plain)  # the penalty changed something
    for row in range(2):
        seq = ids[row, 6 - int(mask[row].sum()):][None]
        for _ in range(6):
            logits = full_logits(model, seq)[:, -1]
            nxt = apply_repetition_penalty(logits, seq, 3.0).argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
        assert torch.equal(out[row, 6:], seq[0, -6:])


def test_sampling_generator_reproducible():
    model = make_model("mamba1")
    ids = torch.randint(0, VOCAB, (2, 3))
    kw = dict(max_new_tokens=12, temperature=1.5, top_k=0, top_p=0.95)
    a = generate(model, ids, generator=torch.Generator().manual_seed(5), **kw)
    b = generate(model, ids, generator=torch.Generator().manual_seed(5), **kw)
    c = generate(model, ids, generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_mamba_ssm_call_shapes():
    model = make_model("mamba1")
    ids = torch.randint(0, VOCAB, (2, 3))
    out = decode(ids, model, 8, output_scores=True)
    assert out.sequences.shape == (2, 8) and len(out.scores) == 5
    same = model.generate(ids, max_length=8, return_dict_in_generate=True, output_scores=True)
    assert torch.equal(same.sequences, out.sequences)
    assert torch.equal(generate(model, ids, 8), out.sequences)  # max_length positional, as in mamba_ssm
    assert torch.equal(generate(model, ids, max_new_tokens=0), ids)


def test_streamer_receives_prompt_then_tokens():
    model = make_model("mamba1")
    ids = torch.randint(0, VOCAB, (1, 3))

    class Recorder:
        def __init__(self):
            self.calls = []

        def put(self, value):
            self.calls.append(value.tolist())

        def end(self):
            self.calls.append("end")

    rec = Recorder()
    out = generate(model, ids, max_new_tokens=4, streamer=rec)
    assert rec.calls[0] == ids.tolist()
    assert [c[0] for c in rec.calls[1:-1]] == out[0, 3:].tolist()
    assert rec.calls[-1] == "end"


def test_bad_inputs():
    model = make_model("mamba1")
    ids = torch.randint(0, VOCAB, (2, 4))
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), max_new_tokens=3)
    with pytest.raises(ValueError, match="below the prompt length"):
        generate(model, ids, max_length=3)
    with pytest.raises(ValueError, match=r"\[0, 37\)"):
        generate(model, ids + VOCAB, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"\[0, 37\)"):
        generate(model, ids - VOCAB, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_length"):
        generate(model, ids)
    with pytest.raises(ValueError, match="disagree"):
        generate(model, ids, max_length=9, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        generate(model, ids[0], max_new_tokens=2)
    with pytest.raises(TypeError, match="integer"):
        generate(model, ids.float(), max_new_tokens=2)
    with pytest.raises(ValueError, match="left"):
        generate(model, ids, max_new_tokens=2, attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="no tokens"):
        generate(model, ids, max_new_tokens=2, attention_mask=torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="is on"):
        generate(model, ids.to("meta"), max_new_tokens=2)
    with pytest.raises(ValueError, match="batch size 1"):
        generate(model, ids, max_new_tokens=2, streamer=object())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cg=True"):
            generate(model, ids, max_new_tokens=2, cg=True)


@requires_cuda
@pytest.mark.parametrize("kind", list(KINDS))
def test_cuda_step_logits_equal_full_forward(kind):
    """The Triton step kernels (fused SSM step, conv update) against the parallel forward."""
    model = make_model(kind, device="cuda", n_layer=4, d_model=64)
    ids = torch.randint(0, VOCAB, (3, 7), device="cuda")
    out = generate(model, ids, max_new_tokens=6, return_dict_in_generate=True, output_scores=True)
    ref = full_logits(model, out.sequences)[:, 6:-1]
    torch.testing.assert_close(torch.stack(out.scores, dim=1), ref, rtol=1e-3, atol=1e-3)


@requires_cuda
@pytest.mark.parametrize("kind,gated_prepass,gate_in_ssm,add_prepass", [
    ("mamba1", True, False, True), ("mamba2", True, False, True), ("mamba2", False, False, True),
    ("mamba2", False, True, True), ("mamba2", False, True, False), ("mamba2", False, False, False)])
def test_cuda_step_logits_equal_full_forward_wide(kind, gated_prepass, gate_in_ssm, add_prepass, monkeypatch):
    """At d_model 2048 the step's norms run as decode_linear's row pre-pass (add + RMSNorm before
    in_proj; Mamba-2's gated RMSNorm over d_inner 4096 before out_proj), or folded into the products
    (Mamba-2's default: add + norm into in_proj + conv and, with the gate in the SSM step, the plain
    RMSNorm into out_proj, FOLD_BLOCK_N features per program), the other products with WIDE_BLOCK_N
    features per program (rows >= WIDE_K). With the add + norm pre-pass Mamba-2's in_proj is a barrier
    (4360 programs) and its SSM step loads the state before the PDL wait."""
    from mamba_pkg.models import mamba2 as m2

    monkeypatch.setattr(dl, "PREPASS_ADD_NORM_ALONE", True)  # Mamba-1's in_proj too
    monkeypatch.setattr(dl, "PREPASS_ADD_NORM_CONV", add_prepass)
    monkeypatch.setattr(dl, "PREPASS_GATED", gated_prepass)
    monkeypatch.setattr(m2, "STEP_GATE_IN_SSM_MAX_DIM", 4096 if gate_in_ssm else 0)
    launches = []
    row_norm = dl._launch_row_norm
    monkeypatch.setattr(dl, "_launch_row_norm", lambda *args: launches.append(1) or row_norm(*args))
    model = make_model(kind, device="cuda", n_layer=2, d_model=2048)
    ids = torch.randint(0, VOCAB, (2, 5), device="cuda")
    out = generate(model, ids, max_new_tokens=3, return_dict_in_generate=True, output_scores=True)
    ref = full_logits(model, out.sequences)[:, 4:-1]
    torch.testing.assert_close(torch.stack(out.scores, dim=1), ref, rtol=1e-3, atol=1e-3)
    per_layer_and_step = int(add_prepass) + int(kind == "mamba2" and gated_prepass and not gate_in_ssm)
    assert len(launches) == per_layer_and_step * 2 * 2


@requires_cuda
@pytest.mark.parametrize("kind", list(KINDS))
def test_cuda_graph_equals_eager(kind):
    model = make_model(kind, device="cuda", n_layer=4, d_model=64)
    torch.manual_seed(0)
    for batch, width in ((1, 9), (3, 5), (3, 12)):
        ids = torch.randint(0, VOCAB, (batch, width), device="cuda")
        eager = generate(model, ids, max_new_tokens=10, return_dict_in_generate=True, output_scores=True)
        graph = generate(model, ids, max_new_tokens=10, return_dict_in_generate=True, output_scores=True, cg=True)
        assert torch.equal(graph.sequences, eager.sequences)
        torch.testing.assert_close(torch.stack(graph.scores), torch.stack(eager.scores), rtol=1e-3, atol=1e-3)
    # a left-padded batch through the graph equals its rows alone
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], device="cuda")
    ids = torch.randint(0, VOCAB, (2, 5), device="cuda")
    graph = generate(model, ids, max_new_tokens=8, attention_mask=mask, cg=True)
    for i in range(2):
        alone = generate(model, ids[i : i + 1, 5 - int(mask[i].sum()):], max_new_tokens=8)
        assert torch.equal(graph[i, 5:], alone[0, -8:])
    assert model.__dict__.get("_mamba_pkg_decode_graphs")
    free_decode_graphs(model)
    assert not model.__dict__.get("_mamba_pkg_decode_graphs")


@requires_cuda
@pytest.mark.parametrize("kind", list(KINDS))
def test_cuda_multistep_graph_equals_eager(kind):
    """Greedy cg=True replays multi-step graphs (GRAPH_STEPS tokens per replay, the rest in
    power-of-two blocks): the same tokens as eager steps, for several batch sizes, prompt lengths
    and repeated calls (the graphs are captured once and reused)."""
    model = make_model(kind, device="cuda", n_layer=4, d_model=64)
    torch.manual_seed(0)
    new = 2 * dec.GRAPH_STEPS + 5
    for batch, width in ((1, 9), (3, 5), (3, 12), (1, 4)):
        ids = torch.randint(0, VOCAB, (batch, width), device="cuda")
        eager = generate(model, ids, max_new_tokens=new)
        graph = generate(model, ids, max_new_tokens=new, cg=True)
        assert torch.equal(graph, eager)
        graph = generate(model, ids, max_new_tokens=dec.GRAPH_STEPS + 1, cg=True)
        assert torch.equal(graph, eager[:, : width + dec.GRAPH_STEPS + 1])
    # EOS handled inside the graph: rows stop at their own EOS (one mid-block), the length is the
    # eager loop's; one id and a list long enough that torch.isin would sort (and sync).
    ids = torch.randint(0, VOCAB, (3, 6), device="cuda")
    free = generate(model, ids, max_new_tokens=new)[:, 6:]
    for eos in (int(free[0, dec.GRAPH_STEPS + 3]), [int(free[1, 2])] + list(range(VOCAB - 12, VOCAB - 1))):
        eager = generate(model, ids, max_new_tokens=new, eos_token_id=eos)
        graph = generate(model, ids, max_new_tokens=new, eos_token_id=eos, cg=True)
        assert torch.equal(graph, eager)
    graphs = model.__dict__["_mamba_pkg_decode_graphs"]
    assert all((dec.GRAPH_STEPS, 0) in g.blocks for g in graphs.values())
    free_decode_graphs(model)


@requires_cuda
@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
@pytest.mark.parametrize("batch", [1, 64])
def test_cuda_eager_step_takes_cached_launches(kind, batch, monkeypatch):
    """An eager decode step (generate(cg=False)'s, under no_grad) launches its Triton kernels through
    ops/_launch.launch: once a step of these shapes has run, a step launches nothing through Triton's own
    launch path (JITFunction.run) and gives that step's bits (logits, greedy tokens, states). The first
    step may take the TMA tiles (compiling them for a capture: the second compiles the pointer loads) and
    is as close. The cached kernels keep programmatic dependent launch (compiled with launch_pdl).
    The layers have the 130m models' widths and state sizes (bf16 states, as bench_generation's eager
    step). (With d_state 8 / headdim 8 Mamba-2 layers at batch 64 the second step differs from the later ones
    in the last bit of some logits, as it did before the cached launches: a launch decision that settles after
    the first steps of a shape, not a race; notes_decode.md, session 12.)"""
    from triton.runtime.jit import JITFunction

    from mamba_pkg.ops import _launch
    from mamba_pkg.ops import conv_xproj_step as cx
    from mamba_pkg.ops import ssm_decode_step as sds
    from mamba_pkg.ops.greedy_argmax import greedy_argmax

    monkeypatch.setattr(_launch, "_caches", {})
    monkeypatch.setattr(_launch, "_VARIANTS_SEEN", set())
    torch.manual_seed(1)
    config = MambaConfig(d_model=768, n_layer=2, vocab_size=VOCAB, ssm_cfg={"layer": kind.capitalize()})
    model = MambaLMHeadModel(config, device="cuda", dtype=torch.bfloat16).eval()
    params = dec._new_cache(model, batch, 16, torch.bfloat16, torch.bfloat16)
    params.lengths_per_sample = torch.full((batch,), 5, dtype=torch.int32, device="cuda")
    params.seqlen_offset = 5
    states = [t for entry in params.key_value_memory_dict.values() for t in entry]
    torch.manual_seed(2)
    for t in states:
        t.normal_()
    start = [t.clone() for t in states]
    tokens = torch.randint(0, VOCAB, (batch,), device="cuda")
    slow = []
    run = JITFunction.run
    monkeypatch.setattr(JITFunction, "run", lambda self, *a, **k: slow.append(self.fn.__name__) or run(self, *a, **k))
    steps = []
    with torch.no_grad():
        for _ in range(3):
            for t, t0 in zip(states, start):
                t.copy_(t0)
            logits = dec._step_eager(model, tokens, params, VOCAB)
            steps.append((len(slow), logits, greedy_argmax(logits), [t.clone() for t in states]))
    assert steps[2][0] == steps[1][0], slow[steps[1][0]:]
    assert torch.equal(steps[2][1], steps[1][1]) and torch.equal(steps[2][2], steps[1][2])
    assert all(torch.equal(a, b) for a, b in zip(steps[2][3], steps[1][3]))
    torch.testing.assert_close(steps[0][1], steps[1][1], rtol=2e-2, atol=2e-2)
    # The kernels launched directly: by the launchers' plans (_launch.Plan, kept in each module's _PLANS,
    # alone or beside other settings) and by _launch.launch (the tl.dot kernel's TMA variant).
    plans = [p for cache in (dl._PLANS, sds._PLANS, cx._PLANS) for value in cache.values()
             for p in (value if isinstance(value, tuple) else (getattr(value, "plain", value),))
             if isinstance(p, _launch.Plan)]
    kernels = (dl._row_norm_kernel, dl._decode_linear_kernel, dl._decode_linear_dot_kernel,
               sds._ssm_decode_step_kernel, cx._conv_xproj_step_kernel)
    cached = [compiled for plan in plans for compiled in plan.compiled()] + [
        entry[0] for kernel in kernels for entry in _launch._caches.get(kernel, {}).values()
        if isinstance(entry, tuple)]
    assert len(cached) >= 3
    assert all(bool(c.metadata.launch_pdl) == dl.use_pdl(tokens) for c in cached)


@requires_cuda
@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
def test_cuda_graph_with_pdl_equals_without(kind, monkeypatch):
    """The decode kernels chained by programmatic dependent launch (each waits for its
    predecessor before touching activations) give the same tokens and logits as plain launches."""
    from mamba_pkg.ops import decode_linear

    model = make_model(kind, device="cuda", n_layer=4, d_model=64).to(torch.bfloat16)
    ids = torch.randint(0, VOCAB, (1, 9), device="cuda")
    runs = []
    for pdl in (True, False):
        monkeypatch.setattr(decode_linear, "PDL", pdl)
        free_decode_graphs(model)
        runs.append(generate(model, ids, max_new_tokens=12, return_dict_in_generate=True, output_scores=True, cg=True))
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    torch.testing.assert_close(torch.stack(runs[0].scores), torch.stack(runs[1].scores), rtol=1e-3, atol=1e-3)
    free_decode_graphs(model)


@requires_cuda
@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
@pytest.mark.parametrize("d_model", [2048, 768])
def test_cuda_dot_step_equals_cublas_step(kind, d_model, monkeypatch):
    """Batch 12 at d_model 2048 or 768 (the 130m models' products: decode_linear.DOT_SMALL_BLOCK_N
    features per program) in bf16, captured: the step's products through decode_linear's tl.dot
    kernel (in_proj with the conv update in its epilogue, split-K out_proj; Mamba-2's RMSNorm folded
    into out_proj) are as accurate as the cuBLAS step with the separate conv / norm kernels: both
    teacher-forced on the fp32 model's tokens, the tl.dot step's score error against the fp32 model's
    scores is at most twice the cuBLAS step's (logits of a few hundred: bf16 rounding alone moves them
    by ~1)."""
    from mamba_pkg.models import _cache_utils
    from mamba_pkg.models import mamba2 as m2

    model = make_model(kind, device="cuda", n_layer=2, d_model=d_model)
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (12, 5), device="cuda")
    ref = generate(model, ids, max_new_tokens=3, return_dict_in_generate=True, output_scores=True)
    model = model.to(torch.bfloat16)
    errs = []
    for dot in (True, False):
        monkeypatch.setattr(_cache_utils, "STEP_DOT_MAX_ROWS", 64 if dot else 0)
        monkeypatch.setattr(m2, "STEP_DOT", dot)
        monkeypatch.setattr(m2, "STEP_DOT_NORM_OUT", dot)
        launches = []
        real = dl._launch_dot
        monkeypatch.setattr(dl, "_launch_dot", lambda *a, **k: launches.append(1) or real(*a, **k))
        free_decode_graphs(model)
        out = generate(model, ids, max_new_tokens=3, return_dict_in_generate=True, output_scores=True, cg=True,
                       teacher_outputs=ref.sequences)
        assert (len(launches) > 0) == dot
        errs.append(max((a.float() - b).abs().max().item() for a, b in zip(out.scores, ref.scores)))
    scale = max(s.abs().max().item() for s in ref.scores)
    assert errs[0] <= 2 * errs[1] + 1e-3 * scale, (errs, scale)
    free_decode_graphs(model)


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_step_kernels_equal_torch_reference(layer, monkeypatch):
    """A mixer's decode step through the Triton kernels (the interpreter on CPU) equals the torch
    backend: batch 1 takes the fused conv+x_proj and decode_linear paths, batch 3 the others."""
    from mamba_pkg.models.mamba import Mamba
    from mamba_pkg.models.mamba2 import Mamba2

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if layer == "Mamba1":
        mixer = Mamba(16, d_state=4, layer_idx=0, device=device)
    else:
        mixer = Mamba2(16, d_state=8, headdim=8, layer_idx=0, device=device)
    for batch in (1, 3):
        u = torch.randn(batch, 1, 16, device=device)
        outs, states = [], []
        for backend in ("torch", "triton"):
            monkeypatch.setenv("MAMBA_PKG_BACKEND", backend)
            torch.manual_seed(1)
            conv_state, ssm_state = (torch.randn_like(t) for t in mixer.allocate_inference_cache(batch, 8))
            with torch.no_grad():
                out, conv_state, ssm_state = mixer.step(u, conv_state, ssm_state)
            outs.append(out)
            states.append((conv_state, ssm_state))
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
        for got, exp in zip(states[1], states[0]):
            torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-4)


def _fused_and_unfused_steps(mixer, u, cache, monkeypatch, setup):
    """mixer.step on copies of cache after setup(fused, launches) patched the switches (fused True,
    then False) and the launchers to record into launches; asserts both steps' outputs and states
    agree, returns the two launch lists."""
    runs = []
    for fused in (True, False):
        launches = []
        setup(fused, launches)
        states = [t.clone() for t in cache]
        with torch.no_grad():
            runs.append((mixer.step(u, *states)[0].float(), states, launches))
        monkeypatch.undo()
        monkeypatch.setenv("MAMBA_PKG_BACKEND", "triton")
    (fused_out, fused_states, fused_launches), (out, states, launches) = runs
    torch.testing.assert_close(fused_out, out, rtol=3e-2, atol=3e-2)
    for got, exp in zip(fused_states, states):
        torch.testing.assert_close(got.float(), exp.float(), rtol=2e-2, atol=2e-2)
    return fused_launches, launches


@pytest.mark.parametrize("batch", [1, 12])
def test_mamba2_fused_step_equals_unfused(batch, monkeypatch):
    """Mamba-2's decode step with the gate applied by the SSM step and a plain RMSNorm folded into
    out_proj (rms_norm_linear), and above SMALL_ROWS rows in_proj + conv update and out_proj as
    decode_linear's tl.dot kernels with the norm split between the SSM step and out_proj (STEP_NORM_FOLD;
    3 launches), equals the unfused step (separate conv update, gated
    RMSNorm, the layers' own products): bf16 weights, the Triton kernels (the interpreter on CPU)."""
    from mamba_pkg.models import _cache_utils
    from mamba_pkg.models import mamba2 as m2

    monkeypatch.setenv("MAMBA_PKG_BACKEND", "triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    mixer = m2.Mamba2(32, d_state=16, headdim=16, layer_idx=0, device=device, dtype=torch.bfloat16)
    u = torch.randn(batch, 1, 32, device=device, dtype=torch.bfloat16)
    cache = [torch.randn_like(t) for t in mixer.allocate_inference_cache(batch, 8)]

    def setup(fused, launches):
        for name in ("STEP_DOT", "STEP_DOT_NORM_OUT", "STEP_GATE_IN_SSM", "STEP_CONV_IN_PROJ"):
            monkeypatch.setattr(m2, name, fused)
        monkeypatch.setattr(_cache_utils, "STEP_DOT_MIN_WEIGHT", 0)  # the tiny layers too
        monkeypatch.setattr(m2, "STEP_NORM_FOLD", fused)
        for name in ("_launch_dot", "_launch_small"):
            real = getattr(dl, name)
            monkeypatch.setattr(dl, name, lambda *a, real=real, name=name, **k: launches.append(name) or real(*a, **k))
        real_fold = m2.rms_scaled_linear
        monkeypatch.setattr(m2, "rms_scaled_linear", lambda *a, **k: launches.append("fold") or real_fold(*a, **k))
    fused_launches, _ = _fused_and_unfused_steps(mixer, u, cache, monkeypatch, setup)
    # Above SMALL_ROWS the norm is folded: the SSM step scales by the norm weight and writes the sums of
    # squares, out_proj (rms_scaled_linear) scales the rows.
    assert fused_launches == (["_launch_dot", "fold", "_launch_dot"] if batch > dl.SMALL_ROWS
                              else ["_launch_small"] * 2)


def test_mamba1_dot_step_equals_unfused(monkeypatch):
    """Mamba-1's decode step at 12 rows with the tl.dot kernel (STEP_DOT_MAX_ROWS): in_proj with the
    conv update in its epilogue, x_proj (STEP_DOT_X_PROJ) and out_proj with their K range split (the
    last program of a tile adds the partials), equals the step of the layers' own products and the
    separate conv update: bf16 weights, the Triton kernels (the interpreter on CPU)."""
    from mamba_pkg.models import _cache_utils
    from mamba_pkg.models import mamba as m1

    monkeypatch.setenv("MAMBA_PKG_BACKEND", "triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    mixer = m1.Mamba(32, d_state=8, layer_idx=0, device=device, dtype=torch.bfloat16)
    u = torch.randn(12, 1, 32, device=device, dtype=torch.bfloat16)
    cache = [torch.randn_like(t) for t in mixer.allocate_inference_cache(12, 8)]

    def setup(fused, launches):
        monkeypatch.setattr(_cache_utils, "STEP_DOT_MAX_ROWS", 64 if fused else 0)
        monkeypatch.setattr(_cache_utils, "STEP_DOT_MIN_WEIGHT", 0)  # the tiny layers too
        monkeypatch.setattr(m1, "STEP_DOT_X_PROJ", True)
        for name, value in (("DOT_BLOCK_N", 16), ("DOT_BLOCK_K", 16), ("DOT_STAGES", 2), ("DOT_MIN_PROGRAMS", 1),
                            ("DOT_MAX_SPLIT", 2), ("DOT_MIN_SPLIT_STEPS", 1), ("DOT_TARGET_PROGRAMS", 1 << 20)):
            monkeypatch.setattr(dl, name, value)
        real = dl._launch_dot
        monkeypatch.setattr(dl, "_launch_dot", lambda *a, **k: launches.append(k.get("conv") is not None) or real(*a, **k))
    fused_launches, launches = _fused_and_unfused_steps(mixer, u, cache, monkeypatch, setup)
    assert fused_launches == [True, False, False] and launches == []  # in_proj + conv, x_proj, out_proj


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")
@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_step_kernels_compile_to_one_graph(layer, monkeypatch):
    """torch.compile(fullgraph=True) of a batch-1 step on the Triton path (custom ops
    decode_linear, conv_xproj_step, ssm_decode_step, updating the caches in place) equals eager."""
    from mamba_pkg.models.mamba import Mamba
    from mamba_pkg.models.mamba2 import Mamba2

    monkeypatch.setenv("MAMBA_PKG_BACKEND", "triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mixer = Mamba(16, d_state=4, layer_idx=0, device=device) if layer == "Mamba1" else \
        Mamba2(16, d_state=8, headdim=8, layer_idx=0, device=device)
    u = torch.randn(1, 1, 16, device=device)
    eager_cache = [torch.randn_like(t) for t in mixer.allocate_inference_cache(1, 8)]
    compiled_cache = [t.clone() for t in eager_cache]
    with torch.no_grad():
        eager = mixer.step(u, *eager_cache)[0]
        compiled = torch.compile(mixer.step, backend="aot_eager", fullgraph=True)(u, *compiled_cache)[0]
    torch.testing.assert_close(compiled, eager)
    for got, exp in zip(compiled_cache, eager_cache):
        torch.testing.assert_close(got, exp)


def test_step_linear_routes_by_rows_width_and_dtype(monkeypatch):
    """decode_linear takes 1-2 rows of any layer, and 3-64 rows of a wide 16-bit layer (its tl.dot
    kernel from 9 rows, cuBLAS inside decode_linear below); the rest goes to the layer (cuBLAS). All
    routes give the layer's result."""
    import copy

    from mamba_pkg.models import _cache_utils

    monkeypatch.setattr(_cache_utils, "STEP_DOT_MAX_ROWS", 64)
    monkeypatch.setattr(_cache_utils, "STEP_DOT_MIN_WEIGHT", 0)
    calls = []
    real = _cache_utils.decode_linear
    monkeypatch.setattr(_cache_utils, "decode_linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    wide = torch.nn.Linear(8, 6400, dtype=torch.bfloat16)  # 100 programs of 64 outputs
    narrow = torch.nn.Linear(8, 40, dtype=torch.bfloat16)
    for layer, rows, routed in ((narrow, 2, True), (narrow, 16, False), (wide, 5, True), (wide, 16, True),
                                (wide, 65, False), (copy.deepcopy(wide).float(), 16, False)):
        x = torch.randn(rows, 8, dtype=layer.weight.dtype)
        calls.clear()
        out = _cache_utils.step_linear(layer, x)
        assert calls == ([rows] if routed else [])
        torch.testing.assert_close(out.float(), layer(x).float(), rtol=2e-2, atol=2e-2)
