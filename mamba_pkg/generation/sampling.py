"""Token sampling: pure functions over a batch of logits.

    logits (B, V) -> repetition penalty -> / temperature -> top-k -> top-p -> min-p -> token (B,)

Every filter works row by row: a row's result never depends on the other rows,
and each knob may be a Python number (same for every row) or a tensor of shape
(B,) (one value per row). Filtered-out entries become -inf; a row always keeps at
least its most likely token, so it can always be sampled.

Conventions (those of mamba_ssm's ``generate``): ``top_k == 1`` or
``temperature == 0`` means greedy; ``top_k == 0`` disables top-k; ``top_p``
outside (0, 1) disables top-p; ``min_p == 0`` disables min-p; a repetition
penalty of 1 does nothing.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

Knob = Union[int, float, torch.Tensor]


def _per_row(
    value: Knob, batch: int, name: str, logits: torch.Tensor, dtype: torch.dtype, low=None, high=None
) -> torch.Tensor:
    """``value`` as a (B,) tensor on the logits' device (a number is broadcast), checked to lie in [low, high].

    A number is checked on the host, so the decode loop never waits for the GPU here.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(batch)
        if value.shape != (batch,):
            raise ValueError(f"{name}: expected a number or a tensor of shape (B,) = ({batch},), got {tuple(value.shape)}")
        out_of_range = torch.zeros_like(value, dtype=torch.bool)
        if low is not None:
            out_of_range |= value < low
        if high is not None:
            out_of_range |= value > high
        if bool(out_of_range.any()):
            raise ValueError(f"{name}: every value must lie in [{low}, {high}]")
        return value.to(device=logits.device, dtype=dtype)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a number or a (B,) tensor, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name}: must lie in [{low}, {high}], got {value}")
    return torch.full((batch,), value, device=logits.device, dtype=dtype)


def _check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits: expected a tensor of shape (B, V), got {shape}")
    if not logits.is_floating_point():
        raise TypeError(f"logits: expected a floating-point tensor, got {logits.dtype}")


def apply_repetition_penalty(
    logits: torch.Tensor, prev_ids: torch.Tensor, penalty: Knob, prev_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Penalise tokens that already occur in each row (CTRL, Keskar et al. 2019).

    A seen token's logit is divided by ``penalty`` if positive, multiplied if
    negative; each token counts once however often it occurs.

    logits: (B, V); prev_ids: (B, T) integer ids seen so far; prev_mask: (B, T)
    bool, False where prev_ids is padding (ignored); penalty: number or (B,), > 0.
    Returns new logits (B, V).
    """
    _check_logits(logits)
    batch, vocab = logits.shape
    if prev_ids.dim() != 2 or prev_ids.shape[0] != batch:
        raise ValueError(f"prev_ids: expected shape (B, T) with B = {batch}, got {tuple(prev_ids.shape)}")
    penalty_b = _per_row(penalty, batch, "repetition_penalty", logits, torch.float32, low=1e-6)
    if prev_ids.shape[1] == 0:
        return logits.clone()
    ids = prev_ids.long()
    if bool(((ids < 0) | (ids >= vocab)).any()):
        raise ValueError(f"prev_ids: ids must lie in [0, {vocab})")
    if prev_mask is not None and prev_mask.shape != prev_ids.shape:
        raise ValueError(f"prev_mask: expected shape {tuple(prev_ids.shape)}, got {tuple(prev_mask.shape)}")
    return _repetition_penalty(logits, ids, penalty_b, prev_mask)


def _repetition_penalty(logits, ids, penalty_b, prev_mask) -> torch.Tensor:
    """apply_repetition_penalty without the checks (no host sync): ids (B, T) int64 in range."""
    batch, vocab = logits.shape
    if prev_mask is not None:
        # Padding goes to an extra column that is dropped, so it never marks a real token.
        ids = torch.where(prev_mask.bool(), ids, vocab)
    seen = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, ids, True)
    seen = seen[:, :vocab]
    x = logits.float()
    p = penalty_b[:, None]
    penalised = torch.where(x > 0, x / p, x * p)
    return torch.where(seen, penalised, x).to(logits.dtype)


def apply_temperature(logits: torch.Tensor, temperature: Knob) -> torch.Tensor:
    """logits / temperature per row; rows with temperature 0 are left as they are (greedy)."""
    _check_logits(logits)
    t = _per_row(temperature, logits.shape[0], "temperature", logits, torch.float32, low=0)
    t = torch.where(t == 0, torch.ones_like(t), t)
    return (logits.float() / t[:, None]).to(logits.dtype)


def top_k_filter(logits: torch.Tensor, top_k: Knob) -> torch.Tensor:
    """Keep the ``top_k`` largest logits of each row (ties at the boundary kept); 0 keeps all.

    logits (B, V); top_k: int or (B,) int. Returns (B, V) with the rest set to -inf.
    """
    _check_logits(logits)
    batch, vocab = logits.shape
    k = _per_row(top_k, batch, "top_k", logits, torch.long, low=0)
    k = torch.where(k == 0, torch.full_like(k, vocab), k.clamp(max=vocab))
    sorted_logits = logits.sort(dim=-1, descending=True).values
    kth = sorted_logits.gather(1, (k - 1)[:, None])  # (B, 1): the k-th largest value
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: Knob) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches ``top_p``.

    A token is kept if the probability mass strictly before it (in descending
    order) is below top_p, so the most likely token is always kept. Rows with
    top_p <= 0 or >= 1 are not filtered. logits (B, V); top_p number or (B,).
    """
    _check_logits(logits)
    p = _per_row(top_p, logits.shape[0], "top_p", logits, torch.float32)
    if not isinstance(top_p, torch.Tensor) and not 0 < top_p < 1:
        return logits.clone()
    active = (p > 0) & (p < 1)
    sorted_logits, order = logits.float().sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    remove_sorted = (mass_before >= p[:, None]) & active[:, None]
    remove = torch.zeros_like(remove_sorted).scatter(1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: Knob) -> torch.Tensor:
    """Keep tokens whose probability is at least ``min_p`` times the row's top probability.

    logits (B, V); min_p number or (B,) in [0, 1]; 0 disables the filter for that row.
    """
    _check_logits(logits)
    m = _per_row(min_p, logits.shape[0], "min_p", logits, torch.float32, low=0, high=1)
    x = logits.float()
    # p_i >= m * p_max  <=>  x_i - x_max >= log(m); log(0) = -inf keeps every row with m = 0.
    threshold = x.max(dim=-1, keepdim=True).values + torch.log(m)[:, None]
    return logits.masked_fill(x < threshold, float("-inf"))


def process_logits(
    logits: torch.Tensor,
    *,
    temperature: Knob = 1.0,
    top_k: Knob = 0,
    top_p: Knob = 0.0,
    min_p: Knob = 0.0,
    repetition_penalty: Knob = 1.0,
    prev_ids: Optional[torch.Tensor] = None,
    prev_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Apply, in order, repetition penalty, temperature, top-k, top-p and min-p. (B, V) -> (B, V)."""
    _check_logits(logits)
    if prev_ids is not None and not _is_one(repetition_penalty):
        logits = apply_repetition_penalty(logits, prev_ids, repetition_penalty, prev_mask)
    if not _is_one(temperature):
        logits = apply_temperature(logits, temperature)
    if not _is_zero(top_k):
        logits = top_k_filter(logits, top_k)
    if not _is_zero(top_p):
        logits = top_p_filter(logits, top_p)
    if not _is_zero(min_p):
        logits = min_p_filter(logits, min_p)
    return logits


def sample(
    logits: torch.Tensor,
    *,
    temperature: Knob = 1.0,
    top_k: Knob = 1,
    top_p: Knob = 0.0,
    min_p: Knob = 0.0,
    repetition_penalty: Knob = 1.0,
    prev_ids: Optional[torch.Tensor] = None,
    prev_mask: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Pick the next token of each row. logits (B, V) -> ids (B,) int64.

    Rows with top_k == 1 or temperature == 0 take the argmax (after the
    repetition penalty); the other rows draw from the filtered distribution with
    ``generator`` (a torch.Generator on the logits' device, for reproducible runs).
    """
    _check_logits(logits)
    batch = logits.shape[0]
    if prev_ids is not None and not _is_one(repetition_penalty):
        logits = apply_repetition_penalty(logits, prev_ids, repetition_penalty, prev_mask)
    greedy_ids = logits.argmax(dim=-1)
    per_row = isinstance(top_k, torch.Tensor) or isinstance(temperature, torch.Tensor)
    if not per_row and (top_k == 1 or temperature == 0):
        return greedy_ids  # decided on the host: no GPU sync in a greedy decode loop
    filtered = process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    probs = filtered.float().softmax(dim=-1)
    sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    if not per_row:
        return sampled
    k = _per_row(top_k, batch, "top_k", logits, torch.long, low=0)
    t = _per_row(temperature, batch, "temperature", logits, torch.float32, low=0)
    return torch.where((k == 1) | (t == 0), greedy_ids, sampled)


def is_greedy(temperature: Knob, top_k: Knob, repetition_penalty: Knob) -> bool:
    """True when :func:`sample` returns the argmax of the raw logits for every row (decided on the host)."""
    if isinstance(temperature, torch.Tensor) or isinstance(top_k, torch.Tensor) or not _is_one(repetition_penalty):
        return False
    return top_k == 1 or temperature == 0


def _is_one(v: Knob) -> bool:
    return not isinstance(v, torch.Tensor) and v == 1


def _is_zero(v: Knob) -> bool:
    return not isinstance(v, torch.Tensor) and v == 0
