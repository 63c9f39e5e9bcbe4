"""MixerModel (embedding -> blocks -> final norm) and MambaLMHeadModel (+ tied LM head, loss).

Layer i is a Block whose mixer is MHA if i is in config.attn_layer_idx, else Mamba / Mamba2
(config.ssm_cfg["layer"]), with a GatedMLP when config.d_intermediate > 0. Module and
parameter names equal mamba_ssm's MambaLMHeadModel (backbone.embedding, backbone.layers.i.
{norm, mixer, norm2, mlp}, backbone.norm_f, lm_head), so its state dicts load unchanged.
"""

from __future__ import annotations

import copy
import math
from functools import partial
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mamba_pkg.models._cache_utils import step_linear
from mamba_pkg.models.attention import MHA
from mamba_pkg.models.block import Block, add_norm
from mamba_pkg.models.config import MambaConfig
from mamba_pkg.models.mamba import Mamba
from mamba_pkg.models.mamba2 import Mamba2
from mamba_pkg.models.mlp import GatedMLP
from mamba_pkg.models.norm import RMSNorm
from mamba_pkg.ops._library import launcher_op
from mamba_pkg.ops.backend import (
    check_cu_seqlens,
    check_same_device,
    check_tensor,
    seq_idx_from_cu_seqlens,
)
from mamba_pkg.ops.cross_entropy import IGNORE_INDEX, cross_entropy_grad_


# Decode steps compute the logits with models/_cache_utils.step_linear: up to STEP_LINEAR_MAX_ROWS
# rows the lm_head weight (vocab x d_model: 206 MB at d_model 2048) streams through decode_linear in
# one PDL-chained launch; cuBLAS's GEMM read it at 2.47 TB/s at batch 1 (mamba2-1.3b, H100, session 7
# profile: 83.5 us of a 1.33 ms step). False: the lm_head module (cuBLAS) at every batch size.
STEP_LM_HEAD = True
# Above SMALL_ROWS rows the logits of a decode step take decode_linear's tl.dot kernel where
# models/_cache_utils.STEP_DOT_MAX_ROWS allows it (True), or cuBLAS (False).
STEP_LM_HEAD_DOT = False


class CausalLMOutput(NamedTuple):
    """logits (B, L or num_last_tokens, padded vocab); loss: scalar fp32 when labels were given."""

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None


def create_block(
    d_model,
    d_intermediate,
    ssm_cfg=None,
    attn_layer_idx=None,
    attn_cfg=None,
    norm_epsilon=1e-5,
    rms_norm=False,
    residual_in_fp32=False,
    fused_add_norm=False,
    layer_idx=None,
    device=None,
    dtype=None,
):
    """One Block of the LM: MHA at attn_layer_idx, else Mamba ("Mamba1") / Mamba2 per ssm_cfg["layer"]."""
    factory_kwargs = {"device": device, "dtype": dtype}
    if layer_idx in (attn_layer_idx or []):
        mixer_cls = partial(MHA, layer_idx=layer_idx, **(attn_cfg or {}), **factory_kwargs)
    else:
        ssm_cfg = copy.deepcopy(ssm_cfg or {})
        layer = ssm_cfg.pop("layer", "Mamba1")
        if layer not in ("Mamba1", "Mamba2"):
            raise ValueError(f"ssm_cfg['layer'] must be 'Mamba1' or 'Mamba2', got {layer!r}")
        mixer_cls = partial(Mamba2 if layer == "Mamba2" else Mamba, layer_idx=layer_idx, **ssm_cfg, **factory_kwargs)
    norm_cls = partial(RMSNorm if rms_norm else nn.LayerNorm, eps=norm_epsilon, **factory_kwargs)
    if d_intermediate == 0:
        mlp_cls = nn.Identity
    else:
        mlp_cls = partial(GatedMLP, hidden_features=d_intermediate, out_features=d_model, **factory_kwargs)
    block = Block(d_model, mixer_cls, mlp_cls, norm_cls=norm_cls, fused_add_norm=fused_add_norm, residual_in_fp32=residual_in_fp32)
    block.layer_idx = layer_idx
    return block


def _init_weights(module, n_layer, initializer_range=0.02, rescale_prenorm_residual=True, n_residuals_per_layer=1):
    """mamba_ssm's init: zero Linear biases (except those marked _no_reinit), N(0, 0.02) embeddings,
    and the residual-branch output projections (out_proj, fc2) rescaled by 1 / sqrt(n_residuals_per_layer * n_layer)
    (GPT-2 scheme: the residual stream sums that many branches)."""
    if isinstance(module, nn.Linear):
        if module.bias is not None and not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=initializer_range)
    if rescale_prenorm_residual:
        for name, p in module.named_parameters():
            if name in ("out_proj.weight", "fc2.weight"):
                # Re-draw before scaling so that calling this twice does not shrink the weights twice.
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                with torch.no_grad():
                    p /= math.sqrt(n_residuals_per_layer * n_layer)


class MixerModel(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_layer: int,
        d_intermediate: int,
        vocab_size: int,
        ssm_cfg=None,
        attn_layer_idx=None,
        attn_cfg=None,
        norm_epsilon: float = 1e-5,
        rms_norm: bool = False,
        initializer_cfg=None,
        fused_add_norm=False,
        residual_in_fp32=False,
        device=None,
        dtype=None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.fused_add_norm = fused_add_norm
        self.gradient_checkpointing = False
        self.embedding = nn.Embedding(vocab_size, d_model, **factory_kwargs)
        self.layers = nn.ModuleList(
            [
                create_block(
                    d_model,
                    d_intermediate=d_intermediate,
                    ssm_cfg=ssm_cfg,
                    attn_layer_idx=attn_layer_idx,
                    attn_cfg=attn_cfg,
                    norm_epsilon=norm_epsilon,
                    rms_norm=rms_norm,
                    residual_in_fp32=residual_in_fp32,
                    fused_add_norm=fused_add_norm,
                    layer_idx=i,
                    **factory_kwargs,
                )
                for i in range(n_layer)
            ]
        )
        self.norm_f = (RMSNorm if rms_norm else nn.LayerNorm)(d_model, eps=norm_epsilon, **factory_kwargs)
        self.apply(
            partial(
                _init_weights,
                n_layer=n_layer,
                **(initializer_cfg or {}),
                n_residuals_per_layer=1 if d_intermediate == 0 else 2,
            )
        )

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        """{layer_idx: the layer mixer's cache tuple} for InferenceParams.key_value_memory_dict."""
        return {
            i: layer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)
            for i, layer in enumerate(self.layers)
        }

    def forward(self, input_ids, inference_params=None, *, cu_seqlens=None):
        """input_ids (B, L) -> hidden states (B, L, d_model) after the final norm."""
        mixer_kwargs = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        hidden_states = self.embedding(input_ids)
        residual = None
        use_checkpoint = self.gradient_checkpointing and self.training and inference_params is None
        for layer in self.layers:
            if use_checkpoint:
                hidden_states, residual = checkpoint(layer, hidden_states, residual, use_reentrant=False, **mixer_kwargs)
            else:
                hidden_states, residual = layer(hidden_states, residual, inference_params=inference_params, **mixer_kwargs)
        hidden_states, _ = add_norm(
            self.norm_f, hidden_states, residual, fused=self.fused_add_norm, residual_in_fp32=self.residual_in_fp32
        )
        return hidden_states


def _check_lm_inputs(input_ids, labels, cu_seqlens, num_last_tokens):
    check_tensor("input_ids", input_ids, ndim=2, dtype=(torch.int64, torch.int32))
    if input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must hold at least one token per row, got shape {tuple(input_ids.shape)}")
    check_tensor("labels", labels, shape=tuple(input_ids.shape), dtype=(torch.int64, torch.int32), optional=True)
    check_same_device(input_ids=input_ids, labels=labels, cu_seqlens=cu_seqlens)
    if not isinstance(num_last_tokens, int) or num_last_tokens < 0:
        raise ValueError(f"num_last_tokens must be an int >= 0, got {num_last_tokens!r}")
    if labels is not None and num_last_tokens > 0:
        raise ValueError("labels need the logits of every position; do not combine them with num_last_tokens > 0")
    check_cu_seqlens(cu_seqlens, input_ids.shape[1], input_ids.shape[0])


def _shifted_targets(labels, cu_seqlens=None):
    """(B, L) int64: position t's target labels[:, t + 1]; IGNORE_INDEX at the last position of each row
    and, with cu_seqlens, at the last token of each packed sequence."""
    targets = F.pad(labels[:, 1:].long(), (0, 1), value=IGNORE_INDEX)
    if cu_seqlens is not None:
        seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, labels.shape[1])
        crosses = F.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (0, 1), value=False)
        targets = targets.masked_fill(crosses, IGNORE_INDEX)
    return targets


def shifted_cross_entropy(logits, labels, cu_seqlens=None):
    """Mean next-token cross entropy: position t predicts labels[:, t + 1].

    logits (B, L, V), labels (B, L) (IGNORE_INDEX = -100 is skipped). With cu_seqlens (packed
    sequences, B == 1) the last token of a sequence does not predict the first of the next.
    Math in fp32.
    """
    targets = _shifted_targets(labels, cu_seqlens)[:, :-1]
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX
    )


def _chunk_loss_and_dlogits(hidden, weight, targets, grad_scale=None):
    """Sum of the cross-entropy terms of one chunk of rows, and grad_scale * d(sum)/d logits in
    hidden's dtype (None without grad_scale).

    hidden (M, d), weight (V, d), targets (M,). The logits come out of the matmul in hidden's dtype
    and the softmax is taken in fp32, as in cross_entropy(logits.float()). With grad_scale, one
    kernel (ops/cross_entropy.py) turns the logits into their gradient in place.
    """
    logits = F.linear(hidden, weight)  # (M, V)
    if grad_scale is not None:
        return cross_entropy_grad_(logits, targets, grad_scale, IGNORE_INDEX).sum(), logits
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    valid = targets != IGNORE_INDEX
    return -(logp.gather(1, targets.clamp(min=0)[:, None])[:, 0] * valid).sum(), None


@launcher_op("lm_head_loss_grads")
def _lm_head_loss_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss fp32 scalar, d mean / d hidden (M, d), d mean / d weight (V, d)) of the logits
    hidden @ weight.T, chunk by chunk of rows. A custom op so that torch.compile keeps this loop
    as one opaque call, with eager's one-chunk-at-a-time memory: traced, the unrolled chunks may
    be scheduled together with their (rows, V) intermediates alive at once (a compiled mamba-130m
    step peaked at 12.2 GiB against 6.0 eager before this op; its effect there is not measured)."""
    inv_count = 1.0 / (targets != IGNORE_INDEX).sum().clamp(min=1).float()
    dhidden = torch.empty_like(hidden)
    # dweight summed over chunks in fp32 and rounded once, as one unfused matmul would. On CUDA
    # the products accumulate into it in their epilogue (out_dtype, in place): no (V, d) bf16
    # partial, no cast, no separate add (~0.16 ms per chunk at mamba-130m's 50280 x 768, H100).
    dweight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
    total = torch.zeros((), device=hidden.device, dtype=torch.float32)
    # Under autocast (fp32 weights) the products take the plain path.
    fp32_out = (hidden.is_cuda and hidden.dtype in (torch.float16, torch.bfloat16) and weight.dtype == hidden.dtype
                and not torch.is_autocast_enabled(hidden.device.type))
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = hidden[start : start + chunk_rows]
        loss, dlogits = _chunk_loss_and_dlogits(rows, weight, targets[start : start + chunk_rows], inv_count)
        total = total + loss
        if fp32_out:
            torch.mm(dlogits, weight, out=dhidden[start : start + chunk_rows])
            torch.addmm(dweight, dlogits.t(), rows, out_dtype=torch.float32, out=dweight)
        else:
            dhidden[start : start + chunk_rows] = dlogits @ weight
            dweight += (dlogits.t() @ rows).float()
    return total * inv_count, dhidden, dweight.to(weight.dtype)


@_lm_head_loss_grads.register_fake
def _(hidden, weight, targets, chunk_rows):
    return hidden.new_empty((), dtype=torch.float32), torch.empty_like(hidden), torch.empty_like(weight)


class _FusedLMHeadLossFn(torch.autograd.Function):
    """Mean cross entropy of the logits hidden @ weight.T, computed chunk by chunk of rows so that the
    (M, V) logits never exist at once (at mamba-130m, 8 x 2048 tokens they are 1.6 GB in bf16 and
    3.3 GB in fp32, several times over in the unfused loss). The loss is a scalar, so the gradients
    are computed in the forward pass, chunk by chunk, and the backward pass only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows):
        """hidden (M, d), weight (V, d), targets (M,) int64 (IGNORE_INDEX skipped) -> loss, scalar fp32."""
        loss, dhidden, dweight = _lm_head_loss_grads(hidden, weight, targets, chunk_rows)
        ctx.save_for_backward(dhidden, dweight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dhidden, dweight = ctx.saved_tensors
        return dhidden * grad_loss.to(dhidden.dtype), dweight * grad_loss.to(dweight.dtype), None, None


def fused_lm_head_loss(hidden_states, weight, labels, cu_seqlens=None, chunk_elems=2**27):
    """The loss of :func:`shifted_cross_entropy` on logits ``hidden_states @ weight.T``, without
    materialising the logits.

    hidden_states (B, L, d), weight (V, d) (the lm_head weight), labels (B, L); cu_seqlens as in
    shifted_cross_entropy. Rows are processed in chunks of about ``chunk_elems / V`` tokens.
    Returns the mean over the scored positions, a scalar fp32.
    """
    targets = _shifted_targets(labels, cu_seqlens).flatten()
    hidden = hidden_states.flatten(0, 1)
    chunk_rows = max(1, chunk_elems // weight.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedLMHeadLossFn.apply(hidden, weight, targets, chunk_rows)
    total = sum(
        _chunk_loss_and_dlogits(hidden[i : i + chunk_rows], weight, targets[i : i + chunk_rows])[0]
        for i in range(0, hidden.shape[0], chunk_rows)
    )
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


class MambaLMHeadModel(nn.Module):
    def __init__(self, config: MambaConfig, initializer_cfg=None, device=None, dtype=None) -> None:
        if not isinstance(config, MambaConfig):
            raise TypeError(f"config must be a MambaConfig, got {type(config).__name__}")
        super().__init__()
        self.config = config
        factory_kwargs = {"device": device, "dtype": dtype}
        self.backbone = MixerModel(
            d_model=config.d_model,
            n_layer=config.n_layer,
            d_intermediate=config.d_intermediate,
            vocab_size=config.padded_vocab_size,
            ssm_cfg=config.ssm_cfg,
            attn_layer_idx=config.attn_layer_idx,
            attn_cfg=config.attn_cfg,
            rms_norm=config.rms_norm,
            initializer_cfg=initializer_cfg,
            fused_add_norm=config.fused_add_norm,
            residual_in_fp32=config.residual_in_fp32,
            **factory_kwargs,
        )
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False, **factory_kwargs)
        self.tie_weights()

    def tie_weights(self):
        if self.config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def gradient_checkpointing_enable(self):
        """Recompute each block's activations in the backward pass (training only)."""
        self.backbone.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.backbone.gradient_checkpointing = False

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        return self.backbone.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)

    def forward(self, input_ids, position_ids=None, inference_params=None, num_last_tokens=0, labels=None, cu_seqlens=None,
                *, return_logits=True):
        """Logits, and with labels the shifted cross-entropy loss.

        Args:
            input_ids: (B, L) int64 / int32 token ids.
            position_ids: accepted for compatibility with transformers-style callers; unused.
            inference_params: InferenceParams for prefill / decode (see mamba_pkg.generation.cache).
            num_last_tokens: if > 0, only the logits of the last num_last_tokens positions.
            labels: (B, L) token ids (usually input_ids); position t is scored on labels[:, t + 1];
                -100 is ignored.
            cu_seqlens: (num_seqs + 1,) int32 packed-sequence boundaries (B == 1); no layer and no
                loss term crosses a boundary.
            return_logits: False (needs labels): the loss is computed chunk by chunk together with
                the lm_head (fused_lm_head_loss), the (B, L, vocab) logits are never materialised,
                and the output's logits are None. Same loss; much less memory in training.
        Returns:
            CausalLMOutput(logits (B, L or num_last_tokens, padded vocab) or None, loss scalar fp32 or None).
        """
        _check_lm_inputs(input_ids, labels, cu_seqlens, num_last_tokens)
        if not return_logits and labels is None:
            raise ValueError("return_logits=False needs labels (it returns only the loss)")
        hidden_states = self.backbone(input_ids, inference_params=inference_params, cu_seqlens=cu_seqlens)
        if not return_logits:
            return CausalLMOutput(logits=None, loss=fused_lm_head_loss(hidden_states, self.lm_head.weight, labels, cu_seqlens))
        if num_last_tokens > 0:
            hidden_states = hidden_states[:, -num_last_tokens:]
        logits = self._step_logits(hidden_states) if self._is_step(hidden_states, inference_params) else self.lm_head(hidden_states)
        loss = None if labels is None else shifted_cross_entropy(logits, labels, cu_seqlens)
        return CausalLMOutput(logits=logits, loss=loss)

    @staticmethod
    def _is_step(hidden_states, inference_params) -> bool:
        """A decode step: one token per row continuing a cache (STEP_LM_HEAD on)."""
        return (STEP_LM_HEAD and inference_params is not None and inference_params.seqlen_offset > 0
                and hidden_states.shape[1] == 1)

    def _step_logits(self, hidden_states):
        """lm_head of a decode step's (B, 1, d_model) hidden states through step_linear."""
        return step_linear(self.lm_head, hidden_states.squeeze(1), dot=STEP_LM_HEAD_DOT).unsqueeze(1)

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs):
        """Load a mamba_ssm / transformers checkpoint (Hub name or local dir); see models.checkpoint."""
        from mamba_pkg.models.checkpoint import load_pretrained

        return load_pretrained(cls, name_or_path, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        """Write config.json + model.safetensors; see models.checkpoint."""
        from mamba_pkg.models.checkpoint import save_pretrained

        return save_pretrained(self, save_directory, **kwargs)

    def push_to_hub(self, repo_id, **kwargs):
        """Upload config.json + model.safetensors to the Hub; see models.checkpoint."""
        from mamba_pkg.models.checkpoint import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    def to_transformers(self):
        """The equivalent transformers MambaForCausalLM / Mamba2ForCausalLM; see models.checkpoint."""
        from mamba_pkg.models.checkpoint import to_transformers

        return to_transformers(self)

    @classmethod
    def from_transformers(cls, hf_model, **kwargs):
        """Build this model from a transformers Mamba / Mamba2 model; see models.checkpoint."""
        from mamba_pkg.models.checkpoint import from_transformers

        return from_transformers(hf_model, cls=cls, **kwargs)

    def generate(self, input_ids, *args, **kwargs):
        """Generate tokens; see mamba_pkg.generation.decode.generate for the arguments
        (mamba_ssm's positional max_length is passed through)."""
        from mamba_pkg.generation.decode import generate

        return generate(self, input_ids, *args, **kwargs)
