"""Mamba (v1) mixer.

    [x, z] = in_proj(u)                           u (B, L, d_model); x, z (B, D, L), D = expand * d_model
    x = silu(causal_conv1d(x))                    width d_conv
    [dt, B, C] = x_proj(x)                        dt (B, L, R) -> dt_proj.weight @ dt  (B, D, L); B, C (B, N, L)
    y = selective_scan(x, dt, A = -exp(A_log), B, C, D, z, delta_bias = dt_proj.bias, softplus)
    out = out_proj(y)                             (B, L, d_model)

Parameter names and shapes equal mamba_ssm's Mamba (in_proj, conv1d, x_proj, dt_proj, A_log,
D, out_proj), so its state dicts load unchanged. Inference cache:
(conv_state (B, D, d_conv), ssm_state (B, D, N) fp32).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat

from mamba_pkg.models._cache_utils import (
    check_mixer_input,
    conv_with_cache,
    dot_rows,
    layer_cache,
    plain_linear,
    step_linear,
)
from mamba_pkg.models._init import inverse_softplus_dt
from mamba_pkg.ops.causal_conv1d import causal_conv1d_update
from mamba_pkg.ops.conv_xproj_step import conv_xproj_step
from mamba_pkg.ops.decode_linear import decode_linear
from mamba_pkg.ops.mamba_inner import mamba_inner_fn
from mamba_pkg.ops.selective_scan import selective_scan_fn
from mamba_pkg.ops.ssm_decode_step import ssm_decode_step

# Up to this batch a decode step fuses the conv with x_proj (conv_xproj_step). The SSM kernel
# then reads S = D / 128 partial sums per row (32 KB per program at batch 2, mamba-1.4b), so
# at larger batch the cuBLAS x_proj (one summed row) is cheaper. 0 switches the fusion off.
FUSED_X_PROJ_MAX_BATCH = 2
# Decode steps whose in_proj takes decode_linear's tl.dot kernel (_cache_utils.dot_rows) run the conv
# update in its epilogue (the x half's channels, conv_start 0): one launch per layer fewer. False: off.
STEP_DOT_CONV = True
# Those steps' x_proj (4096 -> 160 at mamba-1.4b) through the tl.dot kernel too (True), or cuBLAS. Alone it
# did not pay (session 9, H100 b64 step: 2.665 ms with the tl.dot kernel's 16 K splits, 2.649 with cuBLAS);
# with dt_proj by it as well (ssm_decode_step.DT_PROJ_DOT), in_proj to out_proj is one PDL chain: session 10,
# mamba-1.4b 2.426 vs 2.484-2.546 ms, mamba-130m 0.678 vs 0.706-0.709 (graph replays, same process).
STEP_DOT_X_PROJ = True


class Mamba(nn.Module):
    def __init__(
        self,
        d_model,
        d_state=16,
        d_conv=4,
        expand=2,
        dt_rank="auto",
        dt_min=0.001,
        dt_max=0.1,
        dt_init="random",
        dt_scale=1.0,
        dt_init_floor=1e-4,
        conv_bias=True,
        bias=False,
        use_fast_path=True,
        save_scan_states=False,
        layer_idx=None,
        device=None,
        dtype=None,
    ):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.use_fast_path = use_fast_path
        # Training speed for memory: see mamba_inner_fn's save_scan_states.
        self.save_scan_states = save_scan_states
        self.layer_idx = layer_idx
        self.activation = "silu"

        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **factory_kwargs)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner, padding=d_conv - 1, bias=conv_bias,
            **factory_kwargs,
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory_kwargs)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory_kwargs)

        # dt_proj keeps the variance of dt at init; its bias makes softplus(dt) span [dt_min, dt_max].
        dt_init_std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        else:
            raise ValueError(f"dt_init must be 'constant' or 'random', got {dt_init!r}")
        with torch.no_grad():
            self.dt_proj.bias.copy_(inverse_softplus_dt(self.d_inner, dt_min, dt_max, dt_init_floor, **factory_kwargs))
        # The LM's _init_weights zeroes Linear biases; this one must survive it.
        self.dt_proj.bias._no_reinit = True

        # S4D-real init A[d, n] = n + 1, stored as log in fp32.
        A = repeat(torch.arange(1, d_state + 1, dtype=torch.float32, device=device), "n -> d n", d=self.d_inner)
        self.A_log = nn.Parameter(torch.log(A).contiguous())
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory_kwargs)

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, ssm_state_dtype=None, **kwargs):
        """(conv_state (B, D, d_conv) in dtype (default: conv weight dtype), ssm_state (B, D, N) in
        ssm_state_dtype (default fp32; bf16 halves the bytes a decode step moves, as mamba_ssm keeps it))."""
        device = self.out_proj.weight.device
        conv_dtype = self.conv1d.weight.dtype if dtype is None else dtype
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv, device=device, dtype=conv_dtype)
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=device,
                                dtype=ssm_state_dtype or torch.float32)
        return conv_state, ssm_state

    def forward(self, hidden_states, inference_params=None, *, cu_seqlens=None):
        """hidden_states (B, L, d_model) -> (B, L, d_model).

        cu_seqlens (num_seqs + 1,) int32 packs sequences along L (B == 1); no state crosses a
        boundary. With inference_params: seqlen_offset == 0 writes each sequence's final conv
        and ssm states into the cache (cache row s = packed sequence s); seqlen_offset > 0
        continues from the cache (one token: ``step``).
        """
        check_mixer_input("hidden_states", hidden_states, self.d_model, cu_seqlens)
        batch, seqlen, _ = hidden_states.shape
        conv_state = ssm_state = None
        fresh = True
        if inference_params is not None:
            fresh = inference_params.seqlen_offset == 0
            cache_batch = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
            conv_state, ssm_state = layer_cache(self, inference_params, cache_batch)
            if not fresh and seqlen == 1:
                out, _, _ = self.step(hidden_states, conv_state, ssm_state)
                return out

        # xz (B, 2D, L) laid out as (2D, B * L): each (b, d) row has unit stride along L, so the
        # conv and the scan read its x and z halves in place (the transposed (B, L, 2D) output
        # of in_proj(hidden_states) would be copied into that layout, forward and backward).
        xz = rearrange(
            self.in_proj.weight @ rearrange(hidden_states, "b l d -> d (b l)"), "d (b l) -> b d l", l=seqlen
        )
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias.to(xz.dtype)[:, None]
        A = -torch.exp(self.A_log.float())  # (D, N)
        conv_weight = rearrange(self.conv1d.weight, "d 1 w -> d w")
        if self.use_fast_path and inference_params is None:
            return mamba_inner_fn(
                xz,
                conv_weight,
                self.conv1d.bias,
                self.x_proj.weight,
                self.dt_proj.weight,
                self.out_proj.weight,
                self.out_proj.bias,
                A,
                None,
                None,
                self.D.float(),
                delta_bias=self.dt_proj.bias.float(),
                delta_softplus=True,
                cu_seqlens=cu_seqlens,
                save_scan_states=self.save_scan_states,
            )
        x, z = xz.chunk(2, dim=1)
        x = conv_with_cache(x, conv_weight, self.conv1d.bias, self.activation, conv_state, fresh=fresh, cu_seqlens=cu_seqlens)
        x_dbl = self.x_proj(rearrange(x, "b d l -> b l d"))  # (B, L, R + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = rearrange(F.linear(dt, self.dt_proj.weight), "b l d -> b d l")
        B = rearrange(B, "b l n -> b n l")
        C = rearrange(C, "b l n -> b n l")
        y = selective_scan_fn(
            x,
            dt,
            A,
            B,
            C,
            self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            return_last_state=ssm_state is not None,
            initial_state=None if fresh else ssm_state.float(),  # the cache may hold a bf16 state
            cu_seqlens=cu_seqlens,
        )
        if ssm_state is not None:
            y, last_state = y
            ssm_state.copy_(last_state)
        return self.out_proj(rearrange(y, "b d l -> b l d"))

    def step(self, hidden_states, conv_state, ssm_state, *, xz=None):
        """One decode step. hidden_states (B, 1, d_model); conv_state (B, D, d_conv) and
        ssm_state (B, D, N) (fp32 by default) are updated in place. Returns (out (B, 1, d_model), conv_state, ssm_state).
        xz: (B, 2D) in_proj output computed by the caller (the block's fused add + norm + in_proj);
        hidden_states is then not used."""
        conv_weight = self.conv1d.weight.squeeze(1)  # (D, W); not einops: ~10 us of host time per call
        conv_done = False
        if xz is None:
            if hidden_states.dim() != 3 or hidden_states.shape[1] != 1:
                raise ValueError(f"step takes hidden_states (B, 1, d_model), got {tuple(hidden_states.shape)}")
            u = hidden_states.squeeze(1)
            rows = u.shape[0]
            if STEP_DOT_CONV and rows > FUSED_X_PROJ_MAX_BATCH and dot_rows(self.in_proj, rows, u.dtype):
                conv = (conv_state, conv_weight, self.conv1d.bias, 0, self.activation)
                xz, conv_done = decode_linear(u, self.in_proj.weight, self.in_proj.bias, conv=conv), True
            else:
                xz = step_linear(self.in_proj, u)
        x, z = xz.chunk(2, dim=-1)  # (B, D) each
        split_sum = x.shape[0] <= FUSED_X_PROJ_MAX_BATCH and self.x_proj.bias is None and plain_linear(self.x_proj)
        if conv_done:
            x_dbl = step_linear(self.x_proj, x, dot=STEP_DOT_X_PROJ)
        elif split_sum:
            # Small batch (launch-bound): the conv and x_proj in one kernel, leaving the x_proj
            # as per-block partial sums (S, B, R + 2N) that the SSM kernel adds up.
            x, x_dbl = conv_xproj_step(x, conv_state, conv_weight, self.conv1d.bias, self.x_proj.weight,
                                       self.activation)
        else:
            x = causal_conv1d_update(x, conv_state, conv_weight, self.conv1d.bias, self.activation)
            x_dbl = step_linear(self.x_proj, x)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        # One fused kernel: dt_proj, + bias, softplus, A = -exp(A_log), state update, D, z gate.
        y = ssm_decode_step(ssm_state, x, dt, self.A_log, B, C, self.D, z=z, dt_bias=self.dt_proj.bias,
                            dt_proj_weight=self.dt_proj.weight, split_sum=split_sum)
        return step_linear(self.out_proj, y).unsqueeze(1), conv_state, ssm_state

    def cached_step(self, xz, inference_params):
        """A decode step (seqlen_offset > 0) from the in_proj output xz (B, 2D), on this layer's
        rows of the cache in inference_params. Returns (B, 1, d_model)."""
        conv_state, ssm_state = layer_cache(self, inference_params, xz.shape[0])
        return self.step(None, conv_state, ssm_state, xz=xz)[0]
