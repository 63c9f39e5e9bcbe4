"""Autoregressive generation with a recurrent-state cache.

    prompt (B, L) --prefill (parallel kernels, chunks of prefill_chunk_size)--> states in InferenceParams
                  --step x T (one token per step, step kernels)--> sequences (B, L + T)

- Prompts of different lengths come left-padded with ``attention_mask`` (B, L).
  Padding never enters a state: the unpadded prompts are prefilled packed in one
  varlen call (cu_seqlens; each sequence's state lands in its cache row), or, when
  they do not fit in one chunk, per distinct length in chunks with the states
  copied into the batch cache. Attention layers take each row's position from
  ``lengths_per_sample``. So each row decodes exactly as it would alone.
- Each row stops at its own EOS: after it, the row receives ``pad_token_id``
  (default: the EOS id) and no longer counts; the loop ends when every row is done.
- ``cg=True`` on CUDA replays a CUDA graph of the one-token step. The graph is
  captured once per (batch size, dtype, device) and kept on the model, together
  with its cache, for later calls (a longer max_length re-captures);
  ``free_decode_graphs(model)`` releases them.
- Greedy decoding without scores, streamer or teacher tokens needs nothing from the host
  between tokens, so it runs GRAPH_STEPS steps per replay of a second graph (argmax, EOS
  bookkeeping, next-token feed and the token's write included): the host loop, the graph
  launch and the all-finished check (a sync) come once per GRAPH_STEPS tokens instead of
  once per token. Steps after every row finished only write padding that is cut off.
- Scores (``output_scores``) are the model's raw logits for each new position,
  (B, vocab_size), before the sampling filters (as in mamba_ssm).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from mamba_pkg.generation.cache import InferenceParams
from mamba_pkg.generation.sampling import is_greedy, sample
from mamba_pkg.ops.greedy_argmax import greedy_argmax

logger = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = 4096
# Greedy steps per replay of the multi-step decode graph (the host's share of a step at
# mamba-130m batch 1 was ~0.1 ms of 0.39 ms with one replay per token).
GRAPH_STEPS = 16
# Greedy choices by ops.greedy_argmax (one program per row over the model's 16-bit logits) instead of
# torch's argmax of an fp32 copy (two launches; 17 us per step at batch 1, V = 50277, H100). False: torch.
GREEDY_ARGMAX = True


@dataclass
class GenerateOutput:
    """``sequences`` (B, L + T) int64: prompt (padding included) then the new tokens;
    ``scores``: T tensors (B, vocab_size) of logits, or None without output_scores;
    ``timings``: {"prefill_ms", "decode_ms", "new_tokens"} when enable_timing."""

    sequences: torch.Tensor
    scores: Optional[tuple] = None
    timings: Optional[dict] = None


# ---------------------------------------------------------------------------
# input checks


def _model_vocab_size(model, vocab_size: Optional[int]) -> int:
    if vocab_size is not None:
        return int(vocab_size)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "vocab_size", None):
        return int(config.vocab_size)
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embedding is None:
        raise ValueError("vocab_size: cannot be read from the model; pass vocab_size=")
    return int(embedding.weight.shape[0])


def _model_device_dtype(model):
    for p in model.parameters():
        return p.device, p.dtype
    raise ValueError("model: has no parameters")


def _check_inputs(model, input_ids, attention_mask, max_length, max_new_tokens, vocab_size, teacher_outputs, streamer):
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids: expected a torch.Tensor of shape (B, L), got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected shape (B, L), got {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.is_complex():
        raise TypeError(f"input_ids: expected an integer tensor, got {input_ids.dtype}")
    batch, length = input_ids.shape
    if batch == 0 or length == 0:
        raise ValueError(f"input_ids: empty prompt (shape {tuple(input_ids.shape)}); give at least one token per row")
    device, _ = _model_device_dtype(model)
    if input_ids.device != device:
        raise ValueError(f"input_ids: on {input_ids.device}, but the model is on {device}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)} (B, L), got {tuple(attention_mask.shape)}")
        mask = attention_mask.to(device=input_ids.device)
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("attention_mask: values must be 0 (padding) or 1 (token)")
        mask = mask.bool()
        if bool((mask[:, 1:].long() < mask[:, :-1].long()).any()):
            raise ValueError("attention_mask: padding must be on the left (each row: zeros, then ones)")
        if not bool(mask[:, -1].all()):
            raise ValueError("attention_mask: a row has no tokens (empty prompt)")
    else:
        mask = torch.ones_like(input_ids, dtype=torch.bool)
    real = input_ids[mask]
    if bool(((real < 0) | (real >= vocab_size)).any()):
        raise ValueError(
            f"input_ids: token ids must lie in [0, {vocab_size}), got min {int(real.min())}, max {int(real.max())}"
        )
    if max_length is None and max_new_tokens is None:
        raise ValueError("give max_length (prompt + new tokens) or max_new_tokens")
    if max_length is not None and max_new_tokens is not None and max_length != length + max_new_tokens:
        raise ValueError(
            f"max_length={max_length} and max_new_tokens={max_new_tokens} disagree for a prompt of length {length}"
        )
    if max_new_tokens is not None:
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
        max_length = length + max_new_tokens
    if max_length < length:
        raise ValueError(f"max_length={max_length} is below the prompt length {length}")
    if teacher_outputs is not None:
        if teacher_outputs.dim() != 2 or teacher_outputs.shape[0] != batch:
            raise ValueError(f"teacher_outputs: expected shape (B, T) with B = {batch}, got {tuple(teacher_outputs.shape)}")
    if streamer is not None and batch != 1:
        raise ValueError(f"streamer: only batch size 1 can be streamed, got batch {batch}")
    return mask, int(max_length)


def _eos_ids(eos_token_id, device) -> Optional[torch.Tensor]:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids:
        return None
    return torch.tensor(ids, dtype=torch.long, device=device)


# ---------------------------------------------------------------------------
# prefill


def _new_cache(model, batch: int, max_seqlen: int, dtype, ssm_state_dtype=None) -> InferenceParams:
    params = InferenceParams(max_seqlen=max_seqlen, max_batch_size=batch)
    # Only passed when asked for, so that models without the option keep working.
    extra = {} if ssm_state_dtype is None else {"ssm_state_dtype": ssm_state_dtype}
    params.key_value_memory_dict = model.allocate_inference_cache(batch, max_seqlen, dtype=dtype, **extra)
    return params


def _last_logits(model, ids, params, vocab_size, fp32=True) -> torch.Tensor:
    """(B, vocab_size) logits of the last position: fp32, or (fp32=False) a view of the model's own."""
    out = model(ids, inference_params=params, num_last_tokens=1)
    logits = (out.logits if hasattr(out, "logits") else out[0])[:, -1, :vocab_size]
    return logits.float() if fp32 else logits


def _prefill_chunks(model, ids, params, vocab_size, chunk_size: int) -> torch.Tensor:
    """Run ``ids`` (B, L) through the model into ``params``; returns last-position logits (B, V).

    Chunks after the first continue from the states the previous chunk left in
    the cache, so memory is bounded by the chunk, not the prompt.
    """
    length = ids.shape[1]
    logits = None
    for start in range(0, length, chunk_size):
        params.seqlen_offset = start
        if params.lengths_per_sample is not None:
            params.lengths_per_sample.fill_(start)
        logits = _last_logits(model, ids[:, start : start + chunk_size], params, vocab_size)
    params.seqlen_offset = length
    return logits


def _copy_rows(dst: dict, src: dict, rows: torch.Tensor) -> None:
    """dst[layer][k][rows] = src[layer][k] for every cache tensor (batch is dim 0)."""
    for layer, src_entry in src.items():
        dst_entry = dst[layer]
        if isinstance(src_entry, torch.Tensor):
            dst_entry.index_copy_(0, rows, src_entry)
            continue
        for d, s in zip(dst_entry, src_entry):
            if isinstance(s, torch.Tensor):
                d.index_copy_(0, rows, s)


def _prefill_packed(model, input_ids, mask, params, lengths, vocab_size) -> torch.Tensor:
    """Varlen prefill: the unpadded prompts packed into one (1, sum of lengths) call with
    cu_seqlens; the model writes sequence s's states into cache row s."""
    packed = input_ids[mask].unsqueeze(0)  # row by row: each row's tokens are contiguous after left padding
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    params.seqlen_offset = 0
    params.lengths_per_sample.zero_()
    out = model(packed, inference_params=params, cu_seqlens=cu_seqlens)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[0, cu_seqlens[1:].long() - 1, :vocab_size].float()


def _prefill(model, input_ids, mask, params, lengths, vocab_size, cache_dtype, chunk_size,
             ssm_state_dtype=None) -> torch.Tensor:
    """Fill ``params`` with every row's prompt state; returns (B, V) logits for the next token.

    Equal lengths: one batched prefill in chunks. Different lengths: one packed (varlen)
    call if the prompts fit in one chunk, else one chunked prefill per distinct length.
    Either way padding never enters a state.
    """
    batch, width = input_ids.shape
    if bool((lengths == width).all()):
        return _prefill_chunks(model, input_ids, params, vocab_size, chunk_size)
    packed_length = int(lengths.sum())
    if packed_length <= chunk_size:
        logits = _prefill_packed(model, input_ids, mask, params, lengths, vocab_size)
        params.seqlen_offset = width
        return logits
    logits = torch.empty(batch, vocab_size, device=input_ids.device, dtype=torch.float32)
    for length in torch.unique(lengths).tolist():
        rows = (lengths == length).nonzero().squeeze(1)
        group = _new_cache(model, rows.numel(), params.max_seqlen, cache_dtype, ssm_state_dtype)
        group_logits = _prefill_chunks(model, input_ids[rows, width - length :], group, vocab_size, chunk_size)
        _copy_rows(params.key_value_memory_dict, group.key_value_memory_dict, rows)
        logits.index_copy_(0, rows, group_logits)
    params.seqlen_offset = width
    return logits


# ---------------------------------------------------------------------------
# one decode step: eager, or a replayed CUDA graph


def _step_eager(model, tokens, params, vocab_size) -> torch.Tensor:
    return _last_logits(model, tokens[:, None], params, vocab_size)


def _stop(tokens, eos, pad, finished, live) -> torch.Tensor:
    """EOS bookkeeping of one position, on the device: rows already finished get ``pad``; ``live``
    (0-d int64) counts the positions at which some row was unfinished (= tokens generated when
    the loop stops); ``finished`` (B,) bool is updated in place."""
    tokens = torch.where(finished, pad, tokens)
    live += (~finished).any()
    # Not torch.isin: with many EOS ids it takes a sorting path whose unique() syncs (no graph capture).
    finished |= (tokens[:, None] == eos[None, :]).any(dim=1)
    return tokens


def _greedy_steps(model, tokens, params, vocab_size, out, stop=None) -> None:
    """out.shape[1] greedy steps from ``tokens`` (B,): step j feeds ``tokens``, writes the
    argmax (through _stop(*stop) when given) back into ``tokens`` and into ``out[:, j]``
    (out (B, n) int64), and advances each row's length. Run eagerly, or captured as the
    multi-step graph."""
    for j in range(out.shape[1]):
        logits = _last_logits(model, tokens[:, None], params, vocab_size, fp32=not GREEDY_ARGMAX)
        # The argmax of the model's own logits (no fp32 copy: the conversion is exact, the choice the same).
        chosen = greedy_argmax(logits) if GREEDY_ARGMAX else logits.argmax(dim=-1)
        if stop is not None:
            chosen = _stop(chosen, *stop)
        tokens.copy_(chosen)
        out[:, j].copy_(tokens)
        params.lengths_per_sample += 1
        params.seqlen_offset += 1


class DecodeGraph:
    """One captured decode step for a fixed batch size, with the cache it reads and writes.

    Capture runs the step on the graph's own cache (warm-up included), before any
    prefill, so the garbage it leaves is overwritten by the prefill that follows.
    """

    def __init__(self, model, batch: int, max_seqlen: int, dtype, vocab_size: int, ssm_state_dtype=None):
        device, _ = _model_device_dtype(model)
        self.batch, self.max_seqlen, self.dtype, self.vocab_size = batch, max_seqlen, dtype, vocab_size
        self.ssm_state_dtype = ssm_state_dtype
        self.params = _new_cache(model, batch, max_seqlen, dtype, ssm_state_dtype)
        self.params.lengths_per_sample = torch.ones(batch, dtype=torch.int32, device=device)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        # Any offset > 0 selects the step path; positions come from lengths_per_sample.
        self.params.seqlen_offset = 1
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                _step_eager(model, self.tokens, self.params, vocab_size)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = _step_eager(model, self.tokens, self.params, vocab_size)
            # The rest of the step lives in the graph too, so that a greedy loop launches
            # nothing else between replays: the greedy choice becomes the next input, and
            # each row's length advances.
            self.tokens.copy_(greedy_argmax(self.logits) if GREEDY_ARGMAX else self.logits.argmax(dim=-1))
            self.params.lengths_per_sample += 1
        self._storage = _cache_tensors(self.params.key_value_memory_dict)
        # Multi-step greedy graphs, captured on first use, keyed by (steps, number of EOS ids):
        # they read and write the EOS state below in place.
        self.blocks = {}
        self.block_tokens = torch.zeros(batch, GRAPH_STEPS, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.live = torch.zeros((), dtype=torch.long, device=device)
        self.pad = torch.zeros((), dtype=torch.long, device=device)
        self.eos = {}

    def fits(self, batch, max_seqlen, dtype, vocab_size) -> bool:
        return batch == self.batch and max_seqlen <= self.max_seqlen and dtype == self.dtype and vocab_size == self.vocab_size

    def check_storage(self) -> None:
        """The graph replays on fixed addresses: the mixers must update the cache in place."""
        if _cache_tensors(self.params.key_value_memory_dict) != self._storage:
            raise RuntimeError(
                "cg=True: a mixer replaced its cache tensors instead of updating them in place; "
                "the CUDA graph would read stale states. Use cg=False."
            )

    def stop_state(self, eos: torch.Tensor, pad_token_id: int) -> tuple:
        """The graph's EOS state (eos ids, pad, finished, live) set up for a new generation."""
        buf = self.eos.get(eos.numel())
        if buf is None:
            buf = self.eos[eos.numel()] = torch.empty_like(eos)
        buf.copy_(eos)
        self.pad.fill_(pad_token_id)
        self.finished.zero_()
        self.live.zero_()
        return buf, self.pad, self.finished, self.live

    def greedy_block(self, model, tokens: torch.Tensor, steps: int, stop=None) -> torch.Tensor:
        """``steps`` (<= GRAPH_STEPS) greedy steps from ``tokens`` (B,) in one replay (each block
        size is captured on first use); stop: None or ``stop_state(...)``. Returns the tokens
        chosen (B, steps), a view that the next replay overwrites; ``self.tokens`` holds the last
        of them afterwards. The host keeps ``params.seqlen_offset``."""
        key = (steps, 0 if stop is None else stop[0].numel())
        block = self.blocks.get(key)
        out = self.block_tokens[:, :steps]
        if block is None:
            offset = self.params.seqlen_offset
            block = torch.cuda.CUDAGraph()
            with torch.cuda.graph(block):
                _greedy_steps(model, self.tokens, self.params, self.vocab_size, out, stop)
            self.params.seqlen_offset = offset  # capture ran no kernel: the cache is where it was
            self.blocks[key] = block
        if tokens is not self.tokens:
            self.tokens.copy_(tokens)
        block.replay()
        return out

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` (B,) (no copy when they are ``self.tokens``, the greedy choice of the
        last replay), advance ``params.lengths_per_sample`` and return the logits (B, V). After the
        call ``self.tokens`` holds the argmax of the returned logits."""
        if tokens is not self.tokens:
            self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits


def _cache_tensors(cache: dict) -> list:
    out = []
    for layer in sorted(cache):
        entry = cache[layer]
        for t in (entry,) if isinstance(entry, torch.Tensor) else entry:
            out.append(t.data_ptr() if isinstance(t, torch.Tensor) else None)
    return out


def _decode_graph(model, batch, max_seqlen, dtype, vocab_size, ssm_state_dtype=None) -> DecodeGraph:
    graphs = model.__dict__.setdefault("_mamba_pkg_decode_graphs", {})
    device, _ = _model_device_dtype(model)
    key = (batch, dtype, ssm_state_dtype, str(device))
    graph = graphs.get(key)
    if graph is None or not graph.fits(batch, max_seqlen, dtype, vocab_size):
        graphs.pop(key, None)  # free the old graph's memory before capturing a larger one
        graph = DecodeGraph(model, batch, max_seqlen, dtype, vocab_size, ssm_state_dtype)
        graphs[key] = graph
    graph.params.reset(graph.max_seqlen, batch)
    return graph


def free_decode_graphs(model) -> None:
    """Drop the CUDA graphs (and their caches) that ``generate(cg=True)`` keeps on ``model``."""
    model.__dict__.pop("_mamba_pkg_decode_graphs", None)


# ---------------------------------------------------------------------------
# public API


@torch.no_grad()  # not inference_mode: its outputs could not be fed to a model under autograd later
def generate(
    model,
    input_ids: torch.Tensor,
    max_length: Optional[int] = None,
    max_new_tokens: Optional[int] = None,
    *,
    temperature: float = 1.0,
    top_k: int = 1,
    top_p: float = 0.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    eos_token_id: Union[int, Sequence[int], None] = None,
    pad_token_id: Optional[int] = None,
    attention_mask: Optional[torch.Tensor] = None,
    streamer=None,
    cg: bool = False,
    generator: Optional[torch.Generator] = None,
    return_dict_in_generate: bool = False,
    output_scores: bool = False,
    teacher_outputs: Optional[torch.Tensor] = None,
    vocab_size: Optional[int] = None,
    prefill_chunk_size: int = DEFAULT_PREFILL_CHUNK,
    cache_dtype: Optional[torch.dtype] = None,
    ssm_state_dtype: Optional[torch.dtype] = None,
    enable_timing: bool = False,
):
    """Generate tokens after ``input_ids`` with ``model`` (a MambaLMHeadModel or alike).

    input_ids: (B, L) int token ids, left-padded when rows differ in length.
    max_length: total length L + T (mamba_ssm's convention); or max_new_tokens: T.
    temperature, top_k, top_p, min_p, repetition_penalty: see sampling.sample;
        the defaults (top_k=1) are greedy. Each may also be a (B,) tensor.
    eos_token_id: an id or a list of ids; a row that emits one is finished and
        then receives ``pad_token_id`` (default: the first EOS id).
    attention_mask: (B, L) of 0/1, zeros on the left for padding.
    streamer: gets ``put(ids)``/``end()`` (e.g. TextStreamer); batch 1 only.
    cg: replay a CUDA graph of the decode step (CUDA only).
    generator: torch.Generator on the model's device, for reproducible sampling.
    teacher_outputs: (B, T') ids; position p < T' takes teacher_outputs[:, p]
        instead of a sampled token (scores are still the model's).
    vocab_size: sample among the first vocab_size logits (default: model.config.vocab_size).
    prefill_chunk_size: prompt tokens per prefill call (bounds prefill memory).
    cache_dtype: dtype of conv states / KV caches (default: the model's dtype).
    ssm_state_dtype: dtype of the SSM states (default: fp32). torch.bfloat16 halves the
        bytes each decode step moves (what mamba_ssm's generate keeps for a bf16 model), at
        the price of one bf16 rounding of the state per step.
    enable_timing: measure prefill and decode time (synchronising), logged and in output.timings.
    Returns sequences (B, L + T) int64, or a GenerateOutput (sequences, scores,
    timings) when return_dict_in_generate. T is smaller than asked when every
    row finished early.
    """
    vocab_size = _model_vocab_size(model, vocab_size)
    mask, max_length = _check_inputs(
        model, input_ids, attention_mask, max_length, max_new_tokens, vocab_size, teacher_outputs, streamer
    )
    if prefill_chunk_size < 1:
        raise ValueError(f"prefill_chunk_size: must be >= 1, got {prefill_chunk_size}")
    device, model_dtype = _model_device_dtype(model)
    if cg and device.type != "cuda":
        raise ValueError(f"cg=True: CUDA graphs need the model on a CUDA device, it is on {device}; use cg=False")
    cache_dtype = cache_dtype or model_dtype
    eos = _eos_ids(eos_token_id, device)
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if eos is not None else 0
    batch, width = input_ids.shape
    input_ids = input_ids.long()
    lengths = mask.sum(dim=1)
    new_tokens = max_length - width

    sequences = torch.full((batch, max_length), pad_token_id, dtype=torch.long, device=device)
    sequences[:, :width] = input_ids
    seen = torch.zeros(batch, max_length, dtype=torch.bool, device=device)  # marks non-padding positions
    seen[:, :width] = mask
    if eos is None:  # every new position holds a real token: no per-step write
        seen[:, width:] = True
    scores = []
    if streamer is not None:
        streamer.put(input_ids.cpu())

    timer = _Timer(enable_timing, device)
    if new_tokens == 0:
        if streamer is not None:
            streamer.end()
        return _finish(sequences[:, :width], scores, output_scores, return_dict_in_generate, timer, 0)

    graph = _decode_graph(model, batch, max_length, cache_dtype, vocab_size, ssm_state_dtype) if cg else None
    params = graph.params if graph is not None else _new_cache(model, batch, max_length, cache_dtype, ssm_state_dtype)
    if params.lengths_per_sample is None:
        params.lengths_per_sample = torch.zeros(batch, dtype=torch.int32, device=device)
    logits = _prefill(model, input_ids, mask, params, lengths, vocab_size, cache_dtype, prefill_chunk_size,
                      ssm_state_dtype)
    # From here on lengths_per_sample is each row's token count in the cache (its next position).
    params.lengths_per_sample.copy_(lengths)
    if graph is not None:
        graph.check_storage()
    timer.mark("prefill_ms")

    greedy = is_greedy(temperature, top_k, repetition_penalty)
    if greedy and teacher_outputs is None and streamer is None and not output_scores:
        generated = _greedy_decode(model, graph, params, logits, sequences, width, new_tokens, vocab_size, eos,
                                   pad_token_id)
        timer.mark("decode_ms")
        return _finish(sequences[:, : width + generated], scores, output_scores, return_dict_in_generate, timer,
                       generated)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    generated = 0
    for t in range(new_tokens):
        position = width + t
        if output_scores:
            scores.append(logits.clone())
        if teacher_outputs is not None and position < teacher_outputs.shape[1]:
            tokens = teacher_outputs[:, position].to(device=device, dtype=torch.long)
        elif greedy and t > 0 and graph is not None:
            tokens = graph.tokens  # the graph took the argmax of these logits already
        else:
            tokens = sample(
                logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                repetition_penalty=repetition_penalty, prev_ids=sequences[:, :position],
                prev_mask=seen[:, :position], generator=generator,
            )
        if eos is not None:
            tokens = torch.where(finished, torch.full_like(tokens, pad_token_id), tokens)
            seen[:, position] = ~finished
            finished |= torch.isin(tokens, eos)
        sequences[:, position] = tokens
        generated += 1
        if streamer is not None:
            streamer.put(tokens.cpu())
        if t == new_tokens - 1 or (eos is not None and bool(finished.all())):
            break
        if graph is not None:
            logits = graph.step(tokens)  # advances lengths_per_sample inside the graph
        else:
            logits = _step_eager(model, tokens, params, vocab_size)
            params.lengths_per_sample += 1
        params.seqlen_offset += 1
    timer.mark("decode_ms")
    if streamer is not None:
        streamer.end()
    return _finish(sequences[:, : width + generated], scores, output_scores, return_dict_in_generate, timer, generated)


def _greedy_decode(model, graph, params, logits, sequences, width, new_tokens, vocab_size, eos, pad_token_id) -> int:
    """Greedy tokens for positions width .. width + new_tokens - 1 of ``sequences``: the first from
    the prefill ``logits``, then GRAPH_STEPS per replay of a multi-step graph, the rest in blocks
    of 8, 4, 2, 1 steps (at most four more replays); without a graph, eager steps (one at a time
    with EOS, so that none is wasted). With EOS the host reads the all-finished flag once per
    block. Returns the number of tokens generated (fewer than new_tokens when every row finished)."""
    stop = None
    if eos is not None and graph is not None:
        stop = graph.stop_state(eos, pad_token_id)
    elif eos is not None:
        device = eos.device
        finished = torch.zeros(sequences.shape[0], dtype=torch.bool, device=device)
        stop = (eos, torch.tensor(pad_token_id, device=device), finished, torch.zeros((), dtype=torch.long, device=device))
    tokens = logits.argmax(dim=-1)
    if stop is not None:
        tokens = _stop(tokens, *stop)
    sequences[:, width] = tokens
    done = 1
    while done < new_tokens and not (stop is not None and bool(stop[2].all())):
        pos = width + done
        if graph is None:
            n = min(GRAPH_STEPS if stop is None else 1, new_tokens - done)
            _greedy_steps(model, tokens, params, vocab_size, sequences[:, pos : pos + n], stop)
        else:
            n = min(GRAPH_STEPS, 1 << ((new_tokens - done).bit_length() - 1))  # a power of two
            sequences[:, pos : pos + n] = graph.greedy_block(model, tokens, n, stop)
            tokens = graph.tokens
            params.seqlen_offset += n
        done += n
    return new_tokens if stop is None else int(stop[3])


def decode(
    input_ids,
    model,
    max_length,
    top_k=1,
    top_p=0.0,
    min_p=0.0,
    temperature=1.0,
    repetition_penalty=1.0,
    eos_token_id=None,
    teacher_outputs=None,
    vocab_size=None,
    cg=False,
    enable_timing=False,
    output_scores=False,
    streamer=None,
) -> GenerateOutput:
    """mamba_ssm's ``decode`` call shape: (input_ids, model, max_length, ...) -> GenerateOutput."""
    return generate(
        model, input_ids, max_length, top_k=top_k, top_p=top_p, min_p=min_p, temperature=temperature,
        repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, teacher_outputs=teacher_outputs,
        vocab_size=vocab_size, cg=cg, enable_timing=enable_timing, output_scores=output_scores,
        streamer=streamer, return_dict_in_generate=True,
    )


class _Timer:
    def __init__(self, enabled: bool, device):
        self.enabled, self.device = enabled, device
        self.times = {}
        self._last = self._now() if enabled else 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def mark(self, name: str) -> None:
        if self.enabled:
            now = self._now()
            self.times[name] = (now - self._last) * 1e3
            self._last = now


def _finish(sequences, scores, output_scores, return_dict, timer, generated):
    timings = None
    if timer.enabled:
        timings = dict(timer.times, new_tokens=generated)
        logger.info("generate: %s", timings)
    if not return_dict:
        return sequences
    return GenerateOutput(sequences=sequences, scores=tuple(scores) if output_scores else None, timings=timings)
