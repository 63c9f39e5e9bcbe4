"""Cross entropy of a block of logits, and its gradient written over the logits.

logits (M, V), targets (M,) int64, scale a scalar fp32 tensor (the 1 / count of a mean):
    lse[m]     = log(sum_v exp(logits[m, v]))                          (fp32)
    loss[m]    = lse[m] - logits[m, targets[m]]                        (0 where targets[m] == ignore_index)
    dlogits[m] = scale * (softmax(logits[m]) - onehot(targets[m]))     (0 where ignored)
``cross_entropy_grad_`` returns loss (M,) fp32 and overwrites logits with dlogits (rounded to
logits' dtype). This is the loss head of a language model: the lm_head's logits are never needed
again once the loss and its gradient exist, so their buffer takes the gradient. One kernel reads
each logit twice (the second read mostly from L2) and writes it once; the torch version is four
passes over fp32 copies of the block (log_softmax, the scale, exp, the cast).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mamba_pkg.ops._launch import launch
from mamba_pkg.ops._library import launcher_op
from mamba_pkg.ops.backend import (
    FLOAT_DTYPES,
    check_same_device,
    check_tensor,
    next_pow2,
    ptx_exp2,
    ptx_log2,
    ptx_math,
    resolve_backend,
    tl,
    triton,
)

IGNORE_INDEX = -100
# Pieces of 8192 with 32 warps: two programs per SM keep ~26 MB of rows in flight, so the second
# read of a row comes from L2 (with 4096 and 8 warps, ~1000 rows in flight spilled out of L2). One
# 2669 x 50280 bf16 chunk (mamba-130m's loss) on an H100: 291 us against 445 (same run; 4096 with
# 16 or 32 warps 384 / 361 us).
MAX_BLOCK_V = 8192


def cross_entropy_grad_ref(logits: Tensor, targets: Tensor, scale: Tensor, ignore_index: int = IGNORE_INDEX):
    """Torch reference: (loss (M,) fp32, dlogits (M, V) in logits' dtype); logits is not modified.
    A target outside [0, V) that is not ignore_index gives a NaN loss and NaN gradient row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    valid = targets != ignore_index
    in_range = (targets >= 0) & (targets < logits.shape[-1])
    safe = torch.where(in_range, targets, 0)
    bad = valid & ~in_range
    loss = torch.where(valid, -logp.gather(1, safe[:, None])[:, 0], 0.0).masked_fill(bad, float("nan"))
    row_scale = torch.where(valid, scale.float(), 0.0).masked_fill(bad, float("nan"))
    dlogits = logp.exp() * row_scale[:, None]
    dlogits.scatter_add_(1, safe[:, None], torch.where(in_range, -row_scale, 0.0)[:, None])
    return loss, dlogits.to(logits.dtype)


@triton.jit
def _cross_entropy_grad_kernel(
    logits_ptr, targets_ptr, scale_ptr, loss_ptr,
    V, stride_m,
    IGNORE: tl.constexpr, BLOCK_V: tl.constexpr, PTX: tl.constexpr,
):
    """One program per row: an online log-sum-exp over the row in BLOCK_V pieces (base 2), then
    the gradient, stored over the logits it was computed from."""
    i_m = tl.program_id(0).to(tl.int64)
    p_row = logits_ptr + i_m * stride_m
    o_v = tl.arange(0, BLOCK_V)
    LOG2E: tl.constexpr = 1.4426950408889634
    row_max = tl.full([], float("-inf"), tl.float32)
    row_sum = tl.zeros([], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        m_v = v0 + o_v < V
        b_x = tl.load(p_row + v0 + o_v, mask=m_v, other=float("-inf")).to(tl.float32) * LOG2E
        new_max = tl.maximum(row_max, tl.max(b_x, 0))
        row_sum = row_sum * ptx_exp2(row_max - new_max, PTX) + tl.sum(ptx_exp2(b_x - new_max, PTX), 0)
        row_max = new_max
    lse2 = row_max + ptx_log2(row_sum, PTX)  # log2(sum 2^(x log2 e)) = lse / ln 2

    target = tl.load(targets_ptr + i_m)
    valid = target != IGNORE
    in_range = (target >= 0) & (target < V)
    x_target = tl.load(p_row + tl.where(in_range, target, 0)).to(tl.float32)
    nan = float("nan")
    loss = tl.where(valid, tl.where(in_range, lse2 / LOG2E - x_target, nan), 0.0)
    scale = tl.load(scale_ptr).to(tl.float32)
    row_scale = tl.where(valid, tl.where(in_range, scale, nan), 0.0)
    for v0 in range(0, V, BLOCK_V):
        o_col = v0 + o_v
        m_v = o_col < V
        b_x = tl.load(p_row + o_col, mask=m_v, other=0.0).to(tl.float32)
        b_g = ptx_exp2(b_x * LOG2E - lse2, PTX) * row_scale
        b_g = tl.where(o_col == target, b_g - row_scale, b_g)
        tl.store(p_row + o_col, b_g.to(logits_ptr.dtype.element_ty), mask=m_v)
    tl.store(loss_ptr + i_m, loss)


def _cross_entropy_grad_fwd(logits: Tensor, targets: Tensor, scale: Tensor, ignore_index: int) -> Tensor:
    """Kernel-ready inputs (checked by cross_entropy_grad_) -> loss (M,) fp32; logits overwritten."""
    rows, vocab = logits.shape
    loss = torch.empty(rows, device=logits.device, dtype=torch.float32)
    if rows == 0:
        return loss
    block_v = min(next_pow2(vocab), MAX_BLOCK_V)
    launch(_cross_entropy_grad_kernel, (rows,),
        logits, targets, scale, loss, vocab, logits.stride(0),
        IGNORE=ignore_index, BLOCK_V=block_v, PTX=ptx_math(_cross_entropy_grad_kernel),
        num_warps=max(4, min(32, block_v // 256)),
    )
    return loss


_cross_entropy_grad_op = launcher_op("cross_entropy_grad_", mutates_args=("logits",))(_cross_entropy_grad_fwd)


@_cross_entropy_grad_op.register_fake
def _(logits, targets, scale, ignore_index):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


def cross_entropy_grad_(logits: Tensor, targets: Tensor, scale: Tensor, ignore_index: int = IGNORE_INDEX,
                        *, backend: str | None = None) -> Tensor:
    """Per-row cross entropy of ``logits``, overwriting ``logits`` with ``scale`` times its gradient.

    Args:
        logits: (M, V) fp32 / fp16 / bf16, unit stride along V. Overwritten with
            dlogits = scale * (softmax(logits) - onehot(targets)), 0 on ignored rows.
        targets: (M,) int64 class ids in [0, V), or ignore_index. Any other id gives that row a
            NaN loss and a NaN gradient (checking on the host would cost a device sync).
        scale: scalar (0-dim) fp32 tensor on logits' device, e.g. 1 / (number of scored rows).
        ignore_index: target id of rows that are not scored.
        backend: "torch" | "triton" | None (see ops/backend.py).
    Returns:
        loss: (M,) fp32, lse - logits[target] per row (0 on ignored rows). Not differentiable:
        the gradient is what the call writes.
    """
    check_tensor("logits", logits, ndim=2, dtype=FLOAT_DTYPES)
    check_tensor("targets", targets, shape=(logits.shape[0],), dtype=torch.int64)
    check_tensor("scale", scale, shape=(), dtype=torch.float32)
    check_same_device(logits=logits, targets=targets, scale=scale)
    if logits.stride(1) != 1:
        raise ValueError(f"logits must have unit stride along V, got strides {tuple(logits.stride())}")
    if logits.requires_grad and torch.is_grad_enabled():
        raise ValueError("logits must not require grad: cross_entropy_grad_ overwrites them with their gradient")
    if resolve_backend(backend, logits, targets) == "torch":
        loss, dlogits = cross_entropy_grad_ref(logits, targets, scale, ignore_index)
        logits.copy_(dlogits)
        return loss
    return _cross_entropy_grad_op(logits, targets.contiguous(), scale, ignore_index)
