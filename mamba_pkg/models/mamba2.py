"""Mamba-2 mixer.

    [z, xBC, dt] = in_proj(u)                     u (B, L, d_model); z (B, L, D_ssm), dt (B, L, H)
    [x, B, C] = silu(causal_conv1d(xBC))          x (B, L, H, P); B, C (B, L, G, N)
    y = ssd(x, dt, A = -exp(A_log), B, C, D, dt_bias, softplus, dt_limit)
    y = rmsnorm_gated(y, z)  (or y * silu(z) without rmsnorm)
    out = out_proj(y)                             (B, L, d_model)

With d_ssm < expand * d_model the remaining channels are a gated MLP inside the mixer
(in_proj also yields [z0, x0]; out_proj sees [silu(z0) * x0, y]).
Parameter names and shapes equal mamba_ssm's Mamba2 (in_proj, conv1d, dt_bias, A_log, D,
norm.weight, out_proj). Inference cache: (conv_state (B, conv_dim, d_conv), ssm_state (B, H, P, N) fp32).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from mamba_pkg.models import _cache_utils
from mamba_pkg.models._cache_utils import (
    check_mixer_input,
    conv_with_cache,
    layer_cache,
    plain_linear,
    step_linear,
)
from mamba_pkg.models._init import inverse_softplus_dt
from mamba_pkg.models.norm import RMSNormGated
from mamba_pkg.ops.causal_conv1d import causal_conv1d_update
from mamba_pkg.ops import decode_linear as _dl
from mamba_pkg.ops.decode_linear import decode_linear, gated_rms_norm_linear, rms_norm_linear, rms_scaled_linear
from mamba_pkg.ops.ssd.combined import (
    mamba_chunk_scan_combined,
    mamba_split_conv1d_scan_combined,
)
from mamba_pkg.ops.ssm_decode_step import ssm_decode_step

# Decode steps of <= STEP_LINEAR_MAX_ROWS rows (models/_cache_utils.py) run the conv update inside
# the in_proj launch (decode_linear's conv argument): one launch per layer fewer (H100 graph replay,
# mamba2-1.3b b1 with the norm unfused: 1.706 vs 1.834 ms per step). False: off.
STEP_CONV_IN_PROJ = True
# Decode steps of decode_linear.SMALL_ROWS < B <= MAX_ROWS rows (16-bit weights of at least
# _cache_utils.STEP_DOT_MIN_WEIGHT) run in_proj with the conv update in its epilogue (STEP_DOT), and the
# RMSNorm + out_proj (STEP_DOT_NORM_OUT, the gate applied by the SSM step), as decode_linear's tl.dot
# kernels chained with the SSM step by programmatic dependent launch (3 launches per layer instead of
# 5). H100 b64 whole step (graph replay, same process, session 9): mamba2-1.3b 4.463 ms vs 4.462 with
# cuBLAS and the separate conv / gated-norm kernels, 4.566 with the gated-norm kernel before out_proj
# (STEP_DOT_NORM_OUT off). (Session 7's kernels
# lost badly, 8.60 vs 4.44 ms: their conv epilogue read the state 2 bytes of every 8 and the norm
# weight's load sat in every K step.)
STEP_DOT = True
STEP_DOT_NORM_OUT = True
# Decode steps of <= STEP_LINEAR_MAX_ROWS rows with d_ssm <= STEP_GATE_IN_SSM_MAX_DIM: the SSM step
# applies the z gate (y * silu(z), rounded once to the activation dtype) and out_proj folds a plain
# RMSNorm of that (rms_norm_linear) instead of the gated RMSNorm (gated_rms_norm_linear): each out_proj
# program re-reads one row instead of two and computes no sigmoids. norm_before_gate False, one norm
# group. H100 b1 whole step (graph replay, same process): mamba2-130m (d_ssm 1536) 0.268-0.271 vs
# 0.280 ms. mamba2-1.3b (4096): with the add + norm as a pre-pass before in_proj 1.318-1.342 vs 1.300
# without (session 7: the pre-pass after out_proj took 4.4 instead of 1.4 us); with it folded into
# in_proj (decode_linear.FOLD_BLOCK_N, session 8) 1.276 vs 1.316-1.323 without, 1.303-1.307 for the
# session-7 settings (results/sweep_decode_session8a.json).
STEP_GATE_IN_SSM = True
STEP_GATE_IN_SSM_MAX_DIM = 4096
# Decode steps of decode_linear.SMALL_ROWS < B rows that take the tl.dot out_proj (STEP_DOT_NORM_OUT) with the
# gate in the SSM step: the RMSNorm is split between the two launches instead of run in out_proj's K loop: the
# SSM step writes y * norm_weight and per-program sums of squares, out_proj (decode_linear.rms_scaled_linear)
# a plain product that scales the rows. H100 b64 whole steps (graph replay, same process, session 13, with
# the SSM step's 4 warps from ssm_decode_step.MANY_ROWS rows (16-bit states) and DOT_SUMS_EARLY): mamba2-1.3b
# 4.052 ms vs 4.217 without the fold, mamba2-130m 0.882 vs 0.930 (results/sweep_decode_s13_fold_b.json; with
# the SSM step's former 8 warps the fold lost: 4.331 vs 4.201-4.262). False: rms_norm_linear.
STEP_NORM_FOLD = True
# The SSM step loads its state before waiting for the in_proj launch (ssm_decode_step's state_ready)
# where that launch is a barrier (decode_linear.completes_before_next: mamba2-1.3b's in_proj at batch 1,
# 1064 programs of ~108 registers, 4 per SM). H100 b1 whole step (graph replay, same process, session 7,
# in_proj then 4256 programs): 1.318-1.342 ms vs 1.358 off.
STEP_STATE_EARLY = True


class Mamba2(nn.Module):
    def __init__(
        self,
        d_model,
        d_state=128,
        d_conv=4,
        conv_init=None,
        expand=2,
        headdim=64,
        d_ssm=None,
        ngroups=1,
        A_init_range=(1, 16),
        D_has_hdim=False,
        rmsnorm=True,
        norm_before_gate=False,
        dt_min=0.001,
        dt_max=0.1,
        dt_init_floor=1e-4,
        dt_limit=(0.0, float("inf")),
        bias=False,
        conv_bias=True,
        chunk_size=256,
        use_mem_eff_path=True,
        layer_idx=None,
        device=None,
        dtype=None,
    ):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.conv_init = conv_init
        self.expand = expand
        self.d_inner = expand * d_model
        self.headdim = headdim
        self.d_ssm = self.d_inner if d_ssm is None else d_ssm
        if self.d_ssm > self.d_inner:
            raise ValueError(f"d_ssm={self.d_ssm} exceeds expand * d_model={self.d_inner}")
        if self.d_ssm % headdim != 0:
            raise ValueError(f"d_ssm={self.d_ssm} (expand * d_model unless given) must be divisible by headdim={headdim}")
        self.ngroups = ngroups
        self.nheads = self.d_ssm // headdim
        if self.nheads % ngroups != 0:
            raise ValueError(f"the number of heads {self.nheads} must be divisible by ngroups={ngroups}")
        if not (A_init_range[0] > 0 and A_init_range[1] >= A_init_range[0]):
            raise ValueError(f"A_init_range must be (low, high) with 0 < low <= high, got {A_init_range}")
        self.D_has_hdim = D_has_hdim
        self.rmsnorm = rmsnorm
        self.norm_before_gate = norm_before_gate
        self.dt_limit = tuple(dt_limit)
        self.activation = "silu"
        self.chunk_size = chunk_size
        self.use_mem_eff_path = use_mem_eff_path
        self.layer_idx = layer_idx

        # in_proj output order: [z0, x0 (MLP part, if d_ssm < d_inner), z, x, B, C, dt]
        d_in_proj = 2 * self.d_inner + 2 * ngroups * d_state + self.nheads
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=bias, **factory_kwargs)
        conv_dim = self.d_ssm + 2 * ngroups * d_state
        self.conv1d = nn.Conv1d(
            conv_dim, conv_dim, kernel_size=d_conv, groups=conv_dim, padding=d_conv - 1, bias=conv_bias, **factory_kwargs
        )
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)

        self.dt_bias = nn.Parameter(inverse_softplus_dt(self.nheads, dt_min, dt_max, dt_init_floor, **factory_kwargs))
        self.dt_bias._no_weight_decay = True
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(dtype=dtype))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_ssm if D_has_hdim else self.nheads, device=device))
        self.D._no_weight_decay = True
        if rmsnorm:
            self.norm = RMSNormGated(
                self.d_ssm, eps=1e-5, norm_before_gate=norm_before_gate, group_size=self.d_ssm // ngroups, **factory_kwargs
            )
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory_kwargs)

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, ssm_state_dtype=None, **kwargs):
        """(conv_state (B, conv_dim, d_conv) in dtype (default: conv weight dtype), ssm_state (B, H, P, N)
        in ssm_state_dtype (default fp32; bf16 halves the bytes a decode step moves, as mamba_ssm keeps it))."""
        device = self.out_proj.weight.device
        conv_dtype = self.conv1d.weight.dtype if dtype is None else dtype
        conv_state = torch.zeros(batch_size, self.conv1d.weight.shape[0], self.d_conv, device=device, dtype=conv_dtype)
        ssm_state = torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device,
                                dtype=ssm_state_dtype or torch.float32)
        return conv_state, ssm_state

    def _d_mlp(self, zxbcdt):
        return (zxbcdt.shape[-1] - 2 * self.d_ssm - 2 * self.ngroups * self.d_state - self.nheads) // 2

    def _split(self, zxbcdt):
        d_mlp = self._d_mlp(zxbcdt)
        conv_dim = self.d_ssm + 2 * self.ngroups * self.d_state
        return torch.split(zxbcdt, [d_mlp, d_mlp, self.d_ssm, conv_dim, self.nheads], dim=-1)

    def _D(self):
        return rearrange(self.D, "(h p) -> h p", p=self.headdim) if self.D_has_hdim else self.D

    def _finish(self, y, z, z0, x0, step=False):
        """Gate / norm, the in-mixer MLP half, out_proj. y, z (..., D_ssm); step: y is a decode
        step's (B, D_ssm), whose out_proj is step_linear's one launch."""
        if self.rmsnorm:
            y = self.norm(y, z)
        if z0.shape[-1] > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return step_linear(self.out_proj, y) if step else self.out_proj(y)

    def forward(self, u, inference_params=None, *, cu_seqlens=None, seq_idx=None):
        """u (B, L, d_model) -> (B, L, d_model).

        cu_seqlens (num_seqs + 1,) int32 packs sequences along L (B == 1); no state crosses a
        boundary. With inference_params: seqlen_offset == 0 writes each sequence's final conv
        and ssm states into the cache (cache row s = packed sequence s); seqlen_offset > 0
        continues from the cache (one token: ``step``). seq_idx (B, L) int32 (mamba_ssm's
        argument, training only): non-decreasing per row; no state crosses a change of value.
        """
        check_mixer_input("u", u, self.d_model, cu_seqlens)
        if seq_idx is not None and inference_params is not None:
            raise ValueError("seq_idx cannot be combined with inference_params; use cu_seqlens for a packed prefill")
        batch, seqlen, _ = u.shape
        conv_state = ssm_state = None
        fresh = True
        if inference_params is not None:
            fresh = inference_params.seqlen_offset == 0
            cache_batch = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
            conv_state, ssm_state = layer_cache(self, inference_params, cache_batch)
            if not fresh and seqlen == 1:
                out, _, _ = self.step(u, conv_state, ssm_state)
                return out

        zxbcdt = self.in_proj(u)  # (B, L, d_in_proj)
        # A from fp32: in fp16 exp(A_log) can overflow.
        A = -torch.exp(self.A_log.float())  # (H,)
        conv_weight = rearrange(self.conv1d.weight, "d 1 w -> d w")
        if self.use_mem_eff_path and inference_params is None and self._d_mlp(zxbcdt) == 0:
            return mamba_split_conv1d_scan_combined(
                zxbcdt,
                conv_weight,
                self.conv1d.bias,
                self.dt_bias,
                A,
                D=self._D(),
                chunk_size=self.chunk_size,
                dt_limit=self.dt_limit,
                activation=self.activation,
                rmsnorm_weight=self.norm.weight if self.rmsnorm else None,
                rmsnorm_eps=self.norm.eps if self.rmsnorm else 1e-6,
                outproj_weight=self.out_proj.weight,
                outproj_bias=self.out_proj.bias,
                headdim=None if self.D_has_hdim else self.headdim,
                ngroups=self.ngroups,
                norm_before_gate=self.norm_before_gate,
                seq_idx=seq_idx,
                cu_seqlens=cu_seqlens,
            )
        z0, x0, z, xBC, dt = self._split(zxbcdt)
        xBC = conv_with_cache(
            xBC.transpose(1, 2),
            conv_weight,
            self.conv1d.bias,
            self.activation,
            conv_state,
            fresh=fresh,
            cu_seqlens=cu_seqlens,
            seq_idx=seq_idx,
        ).transpose(1, 2)
        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        want_state = ssm_state is not None
        result = mamba_chunk_scan_combined(
            rearrange(x, "b l (h p) -> b l h p", p=self.headdim),
            dt,
            A,
            rearrange(B, "b l (g n) -> b l g n", g=self.ngroups),
            rearrange(C, "b l (g n) -> b l g n", g=self.ngroups),
            chunk_size=self.chunk_size,
            D=self._D(),
            z=None if self.rmsnorm else rearrange(z, "b l (h p) -> b l h p", p=self.headdim),
            dt_bias=self.dt_bias,
            initial_states=None if fresh else ssm_state,
            seq_idx=seq_idx,
            cu_seqlens=cu_seqlens,
            dt_softplus=True,
            dt_limit=self.dt_limit,
            return_final_states=want_state and cu_seqlens is None,
            return_varlen_states=want_state and cu_seqlens is not None,
        )
        if want_state:
            y, final_states = result
            ssm_state.copy_(final_states)
        else:
            y = result
        return self._finish(rearrange(y, "b l h p -> b l (h p)"), z, z0, x0)

    def step(self, hidden_states, conv_state, ssm_state, *, zxbcdt=None, conv_done=False):
        """One decode step. hidden_states (B, 1, d_model); conv_state (B, conv_dim, d_conv) and
        ssm_state (B, H, P, N) (fp32 by default) are updated in place. Returns (out (B, 1, d_model), conv_state, ssm_state).
        zxbcdt: (B, in_proj.out_features) in_proj output computed by the caller (the block's fused
        add + norm + in_proj); hidden_states is then not used. conv_done: that launch also ran the
        conv update (step_conv), so zxbcdt's xBC part is already the conv output."""
        # The caller's in_proj launch (the block's) folded its add + RMSNorm in.
        in_proj_norm = _dl.NORM_NONE if zxbcdt is None else _dl.NORM_ADD
        if zxbcdt is None:
            if hidden_states.dim() != 3 or hidden_states.shape[1] != 1:
                raise ValueError(f"step takes hidden_states (B, 1, d_model), got {tuple(hidden_states.shape)}")
            u = hidden_states.squeeze(1)
            conv = self._step_conv(conv_state, u.shape[0])
            if conv is not None:
                zxbcdt, conv_done = decode_linear(u, self.in_proj.weight, self.in_proj.bias, conv=conv), True
            else:
                zxbcdt = step_linear(self.in_proj, u)
        z0, x0, z, xBC, dt = self._split(zxbcdt)
        if not conv_done:
            conv_weight = rearrange(self.conv1d.weight, "d 1 w -> d w")
            xBC = causal_conv1d_update(xBC, conv_state, conv_weight, self.conv1d.bias, self.activation)
        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        P = self.headdim
        rows = x.shape[0]
        gate_in_ssm = self._gate_in_ssm(rows, z0)
        fold = (gate_in_ssm and STEP_NORM_FOLD and rows > _dl.SMALL_ROWS
                and zxbcdt.dtype == self.out_proj.weight.dtype in (torch.bfloat16, torch.float16))
        # One fused kernel: dt + dt_bias, softplus, dt_limit, A = -exp(A_log), state update, D (and
        # the z gate without rmsnorm, or before out_proj's plain RMSNorm), reading x, B, C, dt, z as
        # views of the conv / in_proj outputs.
        # reshape, not einops' rearrange (the same views, without ~10 us of host time per call on the H100
        # host: an eager step is host-bound).
        y = ssm_decode_step(
            ssm_state,
            x.reshape(rows, -1, P),  # (B, H, P)
            dt,
            self.A_log,
            B.reshape(rows, self.ngroups, -1),  # (B, G, N)
            C.reshape(rows, self.ngroups, -1),
            self._D(),
            z=z.reshape(rows, -1, P) if gate_in_ssm or not self.rmsnorm else None,
            dt_bias=self.dt_bias,
            dt_limit=self.dt_limit,
            # The in_proj launch just before (conv folded in) is a barrier: nothing still running
            # writes this layer's state (its last writer is this layer's previous step).
            state_ready=conv_done and STEP_STATE_EARLY and _dl.completes_before_next(rows, self.in_proj.weight,
                                                                                     in_proj_norm, conv=True),
            norm_weight=self.norm.weight if fold else None,
        )
        if fold:  # y * norm_weight and its rows' partial sums of squares: out_proj finishes the norm
            y, sums = y
            out = rms_scaled_linear(y.reshape(rows, -1), sums, self.out_proj.weight, self.out_proj.bias, self.norm.eps)
            return out.unsqueeze(1), conv_state, ssm_state
        y = y.reshape(rows, -1)  # (B, H * P)
        if gate_in_ssm:  # RMSNorm of the gated y + out_proj in one launch
            out = rms_norm_linear(y, self.norm.weight, self.out_proj.weight, self.out_proj.bias, self.norm.eps)
            return out.unsqueeze(1), conv_state, ssm_state
        if self._fused_norm_step(y, z0):  # gated norm + out_proj in one launch
            out = gated_rms_norm_linear(y, z, self.norm.weight, self.out_proj.weight, self.out_proj.bias, self.norm.eps,
                                        self.norm.norm_before_gate)
            return out.unsqueeze(1), conv_state, ssm_state
        return self._finish(y, z, z0, x0, step=True).unsqueeze(1), conv_state, ssm_state

    @staticmethod
    def _dot_rows(rows, layer, switch) -> bool:
        """A decode step of ``rows`` rows takes decode_linear's tl.dot kernel for ``layer`` (switch:
        STEP_DOT or STEP_DOT_NORM_OUT)."""
        return (switch and _dl.SMALL_ROWS < rows <= _dl.MAX_ROWS and plain_linear(layer)
                and layer.weight.dtype in (torch.bfloat16, torch.float16)
                and layer.weight.numel() >= _cache_utils.STEP_DOT_MIN_WEIGHT)

    def _gate_in_ssm(self, rows, z0) -> bool:
        """The SSM step applies the gate and out_proj a plain RMSNorm (STEP_GATE_IN_SSM up to
        STEP_GATE_IN_SSM_MAX_DIM at <= STEP_LINEAR_MAX_ROWS rows, STEP_DOT_NORM_OUT above SMALL_ROWS):
        rmsnorm after the gate, one norm group spanning the row, no in-mixer MLP, a plain out_proj."""
        if not (self.rmsnorm and not self.norm.norm_before_gate and z0.shape[-1] == 0
                and self.norm.group_size in (None, self.d_ssm) and plain_linear(self.out_proj)):
            return False
        if rows <= _cache_utils.STEP_LINEAR_MAX_ROWS:
            return STEP_GATE_IN_SSM and self.d_ssm <= STEP_GATE_IN_SSM_MAX_DIM
        return self._dot_rows(rows, self.out_proj, STEP_DOT_NORM_OUT)

    def _fused_norm_step(self, y, z0) -> bool:
        """The step's gated RMSNorm can join out_proj: one norm group spanning the row, no
        in-mixer MLP, few rows (STEP_LINEAR_MAX_ROWS), d_ssm <= STEP_GATED_NORM_MAX_DIM."""
        return (self.rmsnorm and z0.shape[-1] == 0 and self.norm.group_size in (None, self.d_ssm)
                and y.shape[0] <= _cache_utils.STEP_LINEAR_MAX_ROWS
                and self.d_ssm <= _cache_utils.STEP_GATED_NORM_MAX_DIM and plain_linear(self.out_proj))

    def _step_conv(self, conv_state, rows):
        """The conv argument of decode_linear / add_rms_norm_linear that folds this layer's conv
        update into the in_proj launch of a decode step (the conv is depthwise: each in_proj
        program owns the channels it writes), or None: STEP_CONV_IN_PROJ off, an in_proj hooked or
        sharded (not plain_linear), or rows neither <= STEP_LINEAR_MAX_ROWS nor in _dot_rows."""
        small = rows <= _cache_utils.STEP_LINEAR_MAX_ROWS
        if not (STEP_CONV_IN_PROJ and (small or self._dot_rows(rows, self.in_proj, STEP_DOT))
                and plain_linear(self.in_proj)):
            return None
        # From the weight, not in_proj.out_features: under tensor parallelism the weight is this rank's rows.
        start = self.in_proj.weight.shape[0] - self.nheads - (self.d_ssm + 2 * self.ngroups * self.d_state)
        return (conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, start, self.activation)  # weight (D, W)

    def step_conv(self, inference_params, rows):
        """_step_conv on this layer's cache rows in inference_params (for the block's fused
        add + norm + in_proj); pass conv_done=True to cached_step when it is not None."""
        return self._step_conv(layer_cache(self, inference_params, rows)[0], rows)

    def cached_step(self, zxbcdt, inference_params, conv_done=False):
        """A decode step (seqlen_offset > 0) from the in_proj output zxbcdt (B, in_proj.out_features),
        on this layer's rows of the cache in inference_params. Returns (B, 1, d_model)."""
        conv_state, ssm_state = layer_cache(self, inference_params, zxbcdt.shape[0])
        return self.step(None, conv_state, ssm_state, zxbcdt=zxbcdt, conv_done=conv_done)[0]
