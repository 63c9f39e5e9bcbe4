"""Greedy decoding's choice: the index of each row's largest logit, as one Triton kernel.

    tokens[b] = argmax_v logits[b, v]        logits (B, V) any float dtype (e.g. a (B, V_padded)
                                             view of the lm_head output); tokens (B,) int64

The first index wins a tie, and a NaN counts as the largest value (the first NaN wins), as in
torch.argmax. In a decode step torch's argmax is a single-block reduction per row over the fp32
copy of the logits: two launches that took 13.3 + 3.8 us per step at batch 1 (V = 50277, H100,
mamba2-1.3b; benchmarks/notes_decode.md, session 7). Here one program per row reads the 16-bit
row itself, every load of the row in flight at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mamba_pkg.ops._launch import Plan, settings_cache
from mamba_pkg.ops._library import launcher_op
from mamba_pkg.ops.backend import FLOAT_DTYPES, cdiv, check_tensor, next_pow2, resolve_backend, tl, triton

BLOCK_V = 4096  # logits per unrolled step of a program (8 per thread: one 16-byte load of bf16)
NUM_WARPS = 16
# Launch plans per (shape, strides, dtype, whether the padded columns may be read): a decode step's
# logits keep theirs from step to step (_launch.settings_cache: dropped when a setting above is set).
_PLANS = settings_cache(__name__)


def greedy_argmax_ref(logits: Tensor) -> Tensor:
    """Torch reference of :func:`greedy_argmax`."""
    return logits.argmax(dim=-1)


@triton.jit
def _greedy_argmax_kernel(x_ptr, out_ptr, V, STRIDE_X_B: tl.constexpr, BLOCK_V: tl.constexpr, V_BLOCKS: tl.constexpr,
                          V_LOAD: tl.constexpr):
    # V_LOAD >= V columns are read (a compile-time bound, a multiple of 8 where the rows are padded that
    # far, so that the loads can be 16-byte vectors); those past V count as -inf. The row stride is a
    # compile-time constant too (the model's padded vocabulary), for the same reason.
    i_b = tl.program_id(0).to(tl.int64)
    p_x = x_ptr + i_b * STRIDE_X_B
    o_lane = tl.arange(0, BLOCK_V)
    b_best = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    b_best_blk = tl.zeros([BLOCK_V], dtype=tl.int32)
    b_nan = tl.zeros([BLOCK_V], dtype=tl.int1)
    # Unrolled over the row: the blocks are independent loads, all issued before the first compare.
    # Each lane keeps its best value and the block it came from; blocks come in index order, so a
    # strict > keeps a lane's first index among equal values.
    for i_v in tl.static_range(V_BLOCKS):
        o_v = i_v * BLOCK_V + o_lane
        b_x = tl.load(p_x + o_v, mask=o_v < V_LOAD, other=float("-inf")).to(tl.float32)
        if i_v == V_BLOCKS - 1:
            b_x = tl.where(o_v < V, b_x, float("-inf"))
        take = b_x > b_best
        b_best = tl.where(take, b_x, b_best)
        b_best_blk = tl.where(take, i_v, b_best_blk)
        b_nan = b_nan | (b_x != b_x)
    b_max = tl.max(b_best, axis=0)
    # The first index holding the maximum; a row of -inf only (every lane still at its start value)
    # has its maximum at index 0, as torch.argmax says.
    i_out = tl.min(tl.where(b_best == b_max, b_best_blk * BLOCK_V + o_lane, V), axis=0)
    if tl.max(b_nan.to(tl.int32), axis=0) > 0:  # rare: the first NaN, found by a second pass
        b_first = tl.full([BLOCK_V], V, dtype=tl.int32)
        for i_n in tl.range(0, V_BLOCKS):
            o_n = i_n * BLOCK_V + o_lane
            b_y = tl.load(p_x + o_n, mask=o_n < V, other=0.0).to(tl.float32)
            b_first = tl.minimum(b_first, tl.where(b_y != b_y, o_n, V))
        i_out = tl.min(b_first, axis=0)
    tl.store(out_ptr + i_b, tl.where(i_out < V, i_out, 0).to(tl.int64))


@launcher_op("greedy_argmax")
def _greedy_argmax(logits: Tensor) -> Tensor:
    if logits.stride(1) != 1:  # the kernel reads rows of unit stride
        logits = logits.contiguous()
    batch, vocab = logits.shape
    out = torch.empty(batch, device=logits.device, dtype=torch.long)
    # Read up to the next multiple of 8 where each row (the last one too) has the columns in memory.
    v_load = cdiv(vocab, 8) * 8
    last = logits.storage_offset() + (batch - 1) * logits.stride(0) + v_load - 1
    aligned = logits.stride(0) >= v_load and last < logits.untyped_storage().nbytes() // logits.element_size()
    key = (batch, vocab, logits.stride(0), aligned)
    plan = _PLANS.get(key)
    if plan is None:
        block_v = min(BLOCK_V, next_pow2(vocab))
        plan = _PLANS[key] = Plan(_greedy_argmax_kernel, (batch,), vocab, STRIDE_X_B=logits.stride(0),
                                  BLOCK_V=block_v, V_BLOCKS=cdiv(vocab, block_v), V_LOAD=v_load if aligned else vocab,
                                  num_warps=NUM_WARPS)
    plan(logits, out)
    return out


@_greedy_argmax.register_fake
def _(logits):
    return logits.new_empty(logits.shape[0], dtype=torch.long)


def greedy_argmax(logits, *, backend=None):
    """Index of the largest logit of each row (torch.argmax(logits, dim=-1)'s result).

    Args:
        logits: (B, V) float (any strides; e.g. the first V columns of a padded lm_head output),
            V < 2**31.
        backend: "torch", "triton" or None (the device decides).
    Returns:
        (B,) int64.
    """
    if not (isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.dtype in FLOAT_DTYPES
            and logits.shape[0] > 0 and 0 < logits.shape[1] < 2**31):
        check_tensor("logits", logits, ndim=2, dtype=FLOAT_DTYPES)
        raise ValueError(f"logits must have shape (B, V) with B >= 1 and 1 <= V < 2**31, got {tuple(logits.shape)}")
    if resolve_backend(backend, logits) == "torch":
        return greedy_argmax_ref(logits)
    return _greedy_argmax(logits)
