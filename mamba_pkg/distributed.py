"""Training past one GPU with torch.distributed: FSDP2 and tensor parallelism (DTensor).

    apply_fsdp(model, mesh)               FSDP2 ``fully_shard`` on every Block, then on the root
    apply_tensor_parallel(model, mesh)    ``parallelize_module`` with the plans below
    gather_state_dict(model)              full single-process state dict (collective)
    save_pretrained_distributed(model, d) gather, then rank 0 writes config.json + safetensors
    clip_grad_norm_(model, max_norm)      gradient clipping over sharded + replicated gradients

Resuming in the same layout: torch.distributed.checkpoint (``dcp.save(model.state_dict(), ...)``,
``dcp.load``) works on both kinds of sharded models as they are.

Tensor-parallel plans (TP size T = mesh size; every rank sees the same input batch):

    GatedMLP  fc1 column-parallel, fc2 row-parallel (``ColwiseParallel`` / ``RowwiseParallel``).
              fc1's rows are [value (hidden), gate (hidden)]; they are permuted before sharding
              so that rank r holds [value_r, gate_r] and ``chunk(2)`` of its local output pairs
              matching channels.
    MHA       in_proj column-parallel by heads: rank r holds [q heads_r, k heads_r, v heads_r,
              (mlp up_r, mlp gate_r)]; GQA needs num_heads_kv % T == 0; the qkv conv (d_conv > 0)
              per local channel; out_proj row-parallel.
    Mamba     in_proj column-parallel per channel: rank r holds [x_r, z_r]; conv1d, dt_proj,
              A_log, D per local channel; x_proj row-parallel (its (dt, B, C) output is
              all-reduced); out_proj row-parallel. Runs Mamba's unfused path (x_proj needs the
              all-reduce between its matmul and the scan).
    Mamba2    in_proj column-parallel: rank r holds [z0_r, x0_r, z_r, x_r, B_r, C_r, dt_r] (heads
              and groups split alike, ngroups % T == 0), or, with ngroups == 1, B and C whole on
              every rank (their gradients are summed over the ranks); conv1d, dt_bias, A_log, D,
              norm.weight per local channel/head; out_proj row-parallel. With ngroups == 1 the
              gated RMSNorm spans all channels, so its sum of squares is all-reduced (and the
              unfused path runs; with ngroups % T == 0 the fused mem-eff path stays).
    Embedding, norms and lm_head stay replicated (plain tensors, broadcast from rank 0 once);
    their gradients are equal on every rank, so they need no reduction.

Sharded parameters are DTensors with ``Shard`` placements over a row-permuted (for replicated
segments: row-repeated) copy of the single-process tensor; the permutation is kept on the
module (``_tp_layout``) and ``gather_state_dict`` undoes it. The mixers run their own forward
on the local shards (``torch.func.functional_call`` with each DTensor's local tensor and the
local head/channel counts; likewise ``step`` and ``allocate_inference_cache``); only the mixer input (gradient all-reduce), the x_proj output, the
gated-norm statistics and the mixer output (all-reduce) cross ranks, each through DTensor
``from_local`` / ``redistribute`` / ``to_local`` so that autograd inserts the matching
backward collectives.

Generation works on a TP model too (each rank keeps the inference cache of its own heads /
channels; feed every rank the same prompt). 2-D parallelism: apply_tensor_parallel on
mesh["tp"], then apply_fsdp on mesh["dp"] of one (dp, tp) mesh (FSDP shards the TP shards).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import (
    DTensor,
    Partial,
    Replicate,
    Shard,
    distribute_tensor,
)
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from mamba_pkg.models.attention import MHA
from mamba_pkg.models.block import Block
from mamba_pkg.models.mamba import Mamba
from mamba_pkg.models.mamba2 import Mamba2
from mamba_pkg.models.mlp import GatedMLP

__all__ = [
    "GatedMLPParallel",
    "MHAParallel",
    "Mamba2Parallel",
    "MambaParallel",
    "apply_fsdp",
    "apply_tensor_parallel",
    "clip_grad_norm_",
    "gather_state_dict",
    "save_pretrained_distributed",
    "tensor_parallel_plan",
]

# Attribute on a parallelized module: {param name relative to it: (dim, index, full size)}.
# The sharded tensor is full.index_select(dim, index) split evenly along dim.
LAYOUT_ATTR = "_tp_layout"

SHARD, REPLICATE = "shard", "replicate"


# ---------------------------------------------------------------------------------------------
# FSDP2
# ---------------------------------------------------------------------------------------------


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    reshard_after_forward: bool = True,
    mp_policy: MixedPrecisionPolicy | None = None,
) -> nn.Module:
    """Shard ``model`` with FSDP2: ``fully_shard`` on each Block (one all-gather / reduce-scatter
    unit per layer), then on the root (embedding, final norm, lm_head).

    Args:
        model: a module holding mamba_pkg Blocks (e.g. MambaLMHeadModel), on the mesh's device.
        mesh: 1-D DeviceMesh over the data-parallel ranks.
        reshard_after_forward: free the gathered parameters after each block's forward (saves
            memory, all-gathers again in backward).
        mp_policy: optional ``torch.distributed.fsdp.MixedPrecisionPolicy`` (e.g. bf16 params,
            fp32 reduce).
    Returns the same module, now an FSDPModule; its parameters are DTensors sharded on dim 0.
    Every rank must start from the same weights (same seed or checkpoint): each keeps its own
    slice of its own copy. Each rank then feeds its own batch; gradients are averaged over the
    ranks. For FSDP over tensor parallelism call apply_tensor_parallel(model, mesh["tp"]) first,
    then this with mesh["dp"].
    """
    if not isinstance(mesh, DeviceMesh) or mesh.ndim != 1:
        raise ValueError(f"mesh must be a 1-D DeviceMesh, got {mesh!r}")
    blocks = [module for module in model.modules() if isinstance(module, Block)]
    if not blocks:
        raise ValueError(f"model ({type(model).__name__}) holds no mamba_pkg Block to shard")
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


# ---------------------------------------------------------------------------------------------
# Collectives with the right backward (through DTensor autograd)
# ---------------------------------------------------------------------------------------------


def _copy_to_ranks(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Identity forward; backward all-reduces the gradient (x is replicated, each rank's use of
    it contributes part of the gradient)."""
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


def _reduce_from_ranks(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """All-reduce (sum) forward; identity backward (the result feeds replicated computation)."""
    return DTensor.from_local(x, mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()]).to_local()


def _reduce_both(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """All-reduce forward and backward (the sum feeds rank-local computation)."""
    summed = DTensor.from_local(x, mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()])
    return summed.to_local(grad_placements=[Partial()])


# ---------------------------------------------------------------------------------------------
# Row layouts: which rows of a parameter each rank holds
# ---------------------------------------------------------------------------------------------


def _segment_index(segments: Sequence[tuple[int, str]], world: int) -> tuple[torch.Tensor, list[tuple[int, int, str]]]:
    """Index over the full dim for segments [(size, SHARD | REPLICATE), ...] laid end to end.

    Rank r's block is, per segment, its r-th contiguous part (SHARD) or the whole segment
    (REPLICATE). Returns (index of length world * local size, local segments [(start, size, mode)]).
    """
    per_rank, local = [], []
    for rank in range(world):
        offset, pieces = 0, []
        for size, mode in segments:
            if mode == SHARD:
                part = size // world
                pieces.append(torch.arange(offset + rank * part, offset + (rank + 1) * part))
            else:
                pieces.append(torch.arange(offset, offset + size))
            offset += size
        per_rank.append(torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long))
    start = 0
    for size, mode in segments:
        local_size = size // world if mode == SHARD else size
        local.append((start, local_size, mode))
        start += local_size
    return torch.cat(per_rank), local


def _require_divisible(what: str, value: int, world: int, module: nn.Module, hint: str = "") -> None:
    if value % world != 0:
        raise ValueError(
            f"tensor parallel size {world} must divide {what}={value} of {type(module).__name__}"
            f" (layer_idx={getattr(module, 'layer_idx', None)}){hint}"
        )


def _mesh_world(mesh: DeviceMesh) -> int:
    if not isinstance(mesh, DeviceMesh) or mesh.ndim != 1:
        raise ValueError(f"mesh must be a 1-D DeviceMesh, got {mesh!r}")
    return mesh.size()


def _replace_parameter(module: nn.Module, name: str, value: torch.Tensor, like: nn.Parameter) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    param = nn.Parameter(value, requires_grad=like.requires_grad)
    # Keep optimizer hints such as _no_weight_decay / _no_reinit.
    for key, attr in vars(like).items():
        if key.startswith("_no_"):
            setattr(param, key, attr)
    owner.register_parameter(leaf, param)


# ---------------------------------------------------------------------------------------------
# GatedMLP: built-in column / row styles
# ---------------------------------------------------------------------------------------------


class GatedMLPParallel(ParallelStyle):
    """GatedMLP: fc1 rows permuted to [value_r, gate_r] per rank, then ColwiseParallel fc1 and
    RowwiseParallel fc2."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        world = _mesh_world(device_mesh)
        hidden = module.fc2.in_features
        _require_divisible("hidden_features", hidden, world, module)
        index, _ = _segment_index([(hidden, SHARD), (hidden, SHARD)], world)
        layout = {}
        with torch.no_grad():
            for leaf in ("weight", "bias"):
                param = getattr(module.fc1, leaf)
                if param is not None:
                    param.data = param.data.index_select(0, index.to(param.device))
                    layout[f"fc1.{leaf}"] = (0, index, 2 * hidden)
        parallelize_module(module, device_mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
        setattr(module, LAYOUT_ATTR, layout)
        return module


# ---------------------------------------------------------------------------------------------
# Mixers: sharded storage, local forward
# ---------------------------------------------------------------------------------------------


class _LocalShardParallel(ParallelStyle):
    """Shards a mixer's parameters by row layouts and runs its forward on the local shards.

    Subclasses give ``_layouts(module, world)`` -> ({param name: (dim, segments)}, {attr: local
    value}) and may add hooks in ``_install``. Parameters without a layout are replicated; the
    output projection's bias (replicated) is added once after the output all-reduce.
    """

    out_bias = "out_proj.bias"

    def _layouts(self, module: nn.Module, world: int):
        raise NotImplementedError

    def _install(self, module: nn.Module, mesh: DeviceMesh, world: int) -> None:
        """Extra hooks (x_proj all-reduce, distributed norm)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        world = _mesh_world(device_mesh)
        layouts, local_attrs = self._layouts(module, world)
        layout_record, grad_sync = {}, {}
        for name, param in list(module.named_parameters()):
            full = param.detach()
            if name in layouts:
                dim, segments = layouts[name]
                index, local_segments = _segment_index(segments, world)
                sharded = distribute_tensor(full.index_select(dim, index.to(full.device)), device_mesh, [Shard(dim)])
                layout_record[name] = (dim, index, full.shape[dim])
                replicated = [(start, size) for start, size, mode in local_segments if mode == REPLICATE and size > 0]
                if replicated:
                    grad_sync[name] = (dim, local_segments)
            else:
                sharded = distribute_tensor(full, device_mesh, [Replicate()])
            _replace_parameter(module, name, sharded, param)
        setattr(module, LAYOUT_ATTR, layout_record)
        self._install(module, device_mesh, world)
        _LocalRunner(module, device_mesh, local_attrs, grad_sync, self.out_bias).install()
        return module


class _LocalRunner:
    """Runs a TP mixer's own methods (forward, step, allocate_inference_cache) on its local
    shards: local tensors (``torch.func.functional_call``) and local sizes swapped in, the
    hidden states' gradient all-reduced, the output all-reduced.

    functional_call can only call ``forward``, so the runner is installed as the instance's
    ``forward`` and dispatches to the method that was asked for (``pending``). Calls made while
    a local run is active (forward -> step, forward -> allocate_inference_cache) go straight to
    the original method: they already see the local tensors.
    """

    def __init__(self, module, mesh, local_attrs, grad_sync, out_bias):
        self.module = module
        self.mesh = mesh
        self.local_attrs = local_attrs
        self.grad_sync = grad_sync
        self.out_bias = out_bias
        self.active = False
        self.pending = None

    def install(self) -> None:
        cls, module = type(self.module), self.module
        inner_forward = cls.forward.__get__(module)
        module.forward = self._forward_entry(inner_forward)
        if hasattr(cls, "step"):
            inner_step = cls.step.__get__(module)
            module.step = lambda *args, **kwargs: self.run(inner_step, args, kwargs, reduce="first")
        if hasattr(cls, "allocate_inference_cache"):
            inner_allocate = cls.allocate_inference_cache.__get__(module)
            module.allocate_inference_cache = lambda *args, **kwargs: self.run(inner_allocate, args, kwargs, reduce=None)

    def _forward_entry(self, inner_forward):
        def forward(*args, **kwargs):
            if self.pending is not None:
                method, method_args, method_kwargs = self.pending
                self.pending = None
                return method(*method_args, **method_kwargs)
            return self.run(inner_forward, args, kwargs, reduce="all")

        return forward

    def _local_param(self, name: str, param: torch.Tensor) -> torch.Tensor:
        local = param.to_local()
        if name not in self.grad_sync:
            return local
        # Rows every rank holds whole (Mamba2 B/C with ngroups == 1): each rank's gradient is a
        # partial sum, so sum it over the ranks to keep the copies equal.
        dim, segments = self.grad_sync[name]
        pieces = []
        for start, size, mode in segments:
            piece = local.narrow(dim, start, size)
            pieces.append(_copy_to_ranks(piece, self.mesh) if mode == REPLICATE else piece)
        return torch.cat(pieces, dim=dim)

    @contextlib.contextmanager
    def _local_sizes(self):
        saved = {attr: getattr(self.module, attr) for attr in self.local_attrs}
        for attr, value in self.local_attrs.items():
            setattr(self.module, attr, value)
        try:
            yield
        finally:
            for attr, value in saved.items():
                setattr(self.module, attr, value)

    def run(self, method, args, kwargs, *, reduce):
        """method(*args, **kwargs) on the local shards. reduce: "all" (the output is a partial
        sum), "first" (so is its first element), None (nothing to reduce, no hidden states)."""
        if self.active:
            return method(*args, **kwargs)
        local, bias = {}, None
        for name, param in self.module.named_parameters():
            tensor = self._local_param(name, param) if isinstance(param, DTensor) else param
            if name == self.out_bias:
                bias = tensor
                # Each rank adds the bias after the all-reduce, not T times inside it.
                tensor = torch.zeros_like(tensor)
            local[name] = tensor
        if reduce is not None:
            args = (_copy_to_ranks(args[0], self.mesh), *args[1:])
        self.pending = (method, args, kwargs)
        self.active = True
        try:
            with self._local_sizes():
                result = torch.func.functional_call(self.module, local, (), {}, strict=False)
        finally:
            self.active = False
            self.pending = None
        if reduce is None:
            return result
        out = result if reduce == "all" else result[0]
        out = _reduce_from_ranks(out, self.mesh)
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out if reduce == "all" else (out, *result[1:])


class MHAParallel(_LocalShardParallel):
    """MHA: heads split over the ranks (see the module docstring)."""

    def _layouts(self, module, world):
        H, Hkv, P = module.num_heads, module.num_heads_kv, module.head_dim
        _require_divisible("num_heads", H, world, module)
        _require_divisible("num_heads_kv", Hkv, world, module)
        half_mlp = module.mlp_dim // 2
        _require_divisible("mlp_dim / 2", half_mlp, world, module)
        qkv = [(H * P, SHARD), (Hkv * P, SHARD), (Hkv * P, SHARD)]
        rows = qkv + [(half_mlp, SHARD), (half_mlp, SHARD)]
        layouts = {"in_proj.weight": (0, rows), "in_proj.bias": (0, rows), "out_proj.weight": (1, [(H * P, SHARD), (half_mlp, SHARD)])}
        if module.d_conv > 0:
            layouts["conv1d.weight"] = (0, qkv)
            layouts["conv1d.bias"] = (0, qkv)
        local_attrs = {"num_heads": H // world, "num_heads_kv": Hkv // world, "mlp_dim": module.mlp_dim // world}
        return layouts, local_attrs


class MambaParallel(_LocalShardParallel):
    """Mamba (v1): channels split over the ranks (see the module docstring)."""

    def _layouts(self, module, world):
        D = module.d_inner
        _require_divisible("d_inner (expand * d_model)", D, world, module)
        channels = [(D, SHARD)]
        layouts = {
            "in_proj.weight": (0, [(D, SHARD), (D, SHARD)]),
            "in_proj.bias": (0, [(D, SHARD), (D, SHARD)]),
            "conv1d.weight": (0, channels),
            "conv1d.bias": (0, channels),
            "x_proj.weight": (1, channels),
            "dt_proj.weight": (0, channels),
            "dt_proj.bias": (0, channels),
            "A_log": (0, channels),
            "D": (0, channels),
            "out_proj.weight": (1, channels),
        }
        # The fused path computes x_proj inside one op; the unfused one calls x_proj as a module,
        # where the hook below all-reduces its output.
        return layouts, {"d_inner": D // world, "use_fast_path": False}

    def _install(self, module, mesh, world):
        module.x_proj.register_forward_hook(lambda _mod, _inp, out: _reduce_both(out, mesh))


def _sharded_gated_rmsnorm(norm: nn.Module, mesh: DeviceMesh, full_size: int, x, z=None):
    """Gated RMSNorm over one group spread across the ranks (x, z (..., D_local)): the sum of
    squares is all-reduced; same math as mamba_pkg.ops.norm.rms_norm_gated_ref."""
    xf = x.float()
    if z is not None and not norm.norm_before_gate:
        xf = xf * F.silu(z.float())
    square_sum = _reduce_both(xf.square().sum(-1, keepdim=True), mesh)
    y = xf * torch.rsqrt(square_sum / full_size + norm.eps) * norm.weight.float()
    if norm.bias is not None:
        y = y + norm.bias.float()
    if z is not None and norm.norm_before_gate:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


class Mamba2Parallel(_LocalShardParallel):
    """Mamba2: heads (and groups) split over the ranks (see the module docstring)."""

    def _layouts(self, module, world):
        H, G, N = module.nheads, module.ngroups, module.d_state
        d_ssm = module.d_ssm
        d_mlp = module.d_inner - d_ssm
        _require_divisible("nheads", H, world, module)
        if G != 1:
            _require_divisible("ngroups", G, world, module, hint="; ngroups=1 (B, C on every rank) also works")
        _require_divisible("d_inner - d_ssm (the in-mixer MLP width)", d_mlp, world, module)
        bc_mode = REPLICATE if G == 1 else SHARD
        xbc = [(d_ssm, SHARD), (G * N, bc_mode), (G * N, bc_mode)]
        rows = [(d_mlp, SHARD), (d_mlp, SHARD), (d_ssm, SHARD)] + xbc + [(H, SHARD)]
        heads = [(H, SHARD)]
        layouts = {
            "in_proj.weight": (0, rows),
            "in_proj.bias": (0, rows),
            "conv1d.weight": (0, xbc),
            "conv1d.bias": (0, xbc),
            "dt_bias": (0, heads),
            "A_log": (0, heads),
            "D": (0, [(d_ssm, SHARD)] if module.D_has_hdim else heads),
            "norm.weight": (0, [(d_ssm, SHARD)]),
            "out_proj.weight": (1, [(d_mlp, SHARD), (d_ssm, SHARD)]),
        }
        local_attrs = {
            "nheads": H // world,
            "d_ssm": d_ssm // world,
            "d_inner": module.d_inner // world,
            "ngroups": 1 if G == 1 else G // world,
        }
        if G == 1 and world > 1 and module.rmsnorm:
            # The norm's single group spans every rank's channels: run the unfused path, whose
            # norm module is replaced below by one that all-reduces its statistics.
            local_attrs["use_mem_eff_path"] = False
        return layouts, local_attrs

    def _install(self, module, mesh, world):
        if module.ngroups == 1 and world > 1 and module.rmsnorm:
            norm = module.norm
            full_size = module.d_ssm
            norm.forward = lambda x, z=None: _sharded_gated_rmsnorm(norm, mesh, full_size, x, z)


_STYLES = ((GatedMLP, GatedMLPParallel), (MHA, MHAParallel), (Mamba, MambaParallel), (Mamba2, Mamba2Parallel))


def tensor_parallel_plan(model: nn.Module) -> dict[str, ParallelStyle]:
    """{module fqn: style} for every GatedMLP, MHA, Mamba and Mamba2 in ``model`` (a plan for
    ``torch.distributed.tensor.parallel.parallelize_module``)."""
    plan = {}
    for name, module in model.named_modules():
        for cls, style in _STYLES:
            if type(module) is cls:
                plan[name] = style()
    return plan


def apply_tensor_parallel(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Split every GatedMLP, MHA, Mamba and Mamba2 of ``model`` over the ranks of ``mesh``.

    Args:
        model: e.g. MambaLMHeadModel (or a single mixer), on the mesh's device, with the same
            weights on every rank (sharded weights are scattered from mesh rank 0; the other
            weights are broadcast from it).
        mesh: 1-D DeviceMesh over the tensor-parallel ranks (size T).
    Returns the same module. Every rank must then feed the same input; outputs (logits, loss)
    are replicated. Raises ValueError naming the module and size when T does not divide its
    heads / channels / groups.
    """
    world = _mesh_world(mesh)
    plan = tensor_parallel_plan(model)
    if not plan:
        raise ValueError(f"model ({type(model).__name__}) holds no GatedMLP, MHA, Mamba or Mamba2 to parallelize")
    # Check every layer before changing any, so a bad size leaves the model untouched.
    for name, style in plan.items():
        module = model.get_submodule(name)
        if isinstance(style, GatedMLPParallel):
            _require_divisible("hidden_features", module.fc2.in_features, world, module)
        else:
            style._layouts(module, world)
    if "" in plan:
        plan[""]._apply(model, mesh)
    else:
        parallelize_module(model, mesh, plan)
    group, src = mesh.get_group(), dist.get_global_rank(mesh.get_group(), 0)
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if not isinstance(tensor, DTensor):
                dist.broadcast(tensor.data, src=src, group=group)
    return model


# ---------------------------------------------------------------------------------------------
# Gradient clipping over sharded and replicated parameters
# ---------------------------------------------------------------------------------------------


def _row_weights(grad: DTensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """Local (..., rows, 1, ...) weights 1 / (copies of the row) for a gradient laid out by
    ``index`` along ``dim``: sharded like the gradient, whatever its placements (TP, FSDP on
    top of TP)."""
    copies = torch.bincount(index)[index].to(grad.device, torch.float32)
    shape = [1] * grad.dim()
    shape[dim] = -1
    mesh = grad.device_mesh
    weights = DTensor.from_local(copies.reciprocal().view(shape), mesh, [Replicate()] * mesh.ndim, run_check=False)
    return weights.redistribute(mesh, grad.placements).to_local()


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients of ``model`` (sharded by apply_fsdp / apply_tensor_parallel, both, or
    neither) to a total 2-norm of ``max_norm``; returns the total norm before clipping (fp32
    scalar, equal on every rank and to the single-process norm).

    torch.nn.utils.clip_grad_norm_ cannot mix DTensor and plain gradients (a TP model has both).
    Here each rank sums the squares of its local gradients, divided by the number of ranks that
    hold the same values (Replicate mesh dims), and one all-reduce per mesh (and mesh dim) adds
    them up;
    rows that every tensor-parallel rank holds whole (Mamba2 B/C with ngroups == 1) count once;
    plain (replicated) gradients count once.
    """
    layouts = _layouts_of(model)
    # Per mesh: with FSDP over TP, TP weights live on the (dp, tp) mesh and the others on dp.
    sharded_sq: dict[DeviceMesh, torch.Tensor] = {}
    replicated_sq = None
    grads = []
    for name, param in model.named_parameters():
        grad = param.grad
        if grad is None:
            continue
        grads.append(grad)
        if not isinstance(grad, DTensor):
            square_sum = grad.float().square().sum()
            replicated_sq = square_sum if replicated_sq is None else replicated_sq + square_sum
            continue
        if any(p.is_partial() for p in grad.placements):
            raise ValueError(f"gradient of {name} is a partial sum ({grad.placements}); reduce it before clipping")
        mesh = grad.device_mesh
        squares = grad.to_local().float().square()
        if name in layouts:
            dim, index, _ = layouts[name]
            if torch.bincount(index).max() > 1:
                squares = squares * _row_weights(grad, dim, index)
        replicas = 1
        for mesh_dim, placement in enumerate(grad.placements):
            if placement.is_replicate():
                replicas *= mesh.size(mesh_dim)
        square_sum = squares.sum() / replicas
        sharded_sq[mesh] = square_sum if mesh not in sharded_sq else sharded_sq[mesh] + square_sum
    if not grads:
        return torch.zeros(())
    device = grads[0].device
    total = torch.zeros((), device=device)
    for mesh, square_sum in sharded_sq.items():
        # Ranks outside this mesh hold the same values (replicated over the other mesh dims).
        for mesh_dim in range(mesh.ndim):
            dist.all_reduce(square_sum, group=mesh.get_group(mesh_dim))
        total = total + square_sum
    if replicated_sq is not None:
        total = total + replicated_sq.to(device)
    total_norm = total.sqrt()
    # One host sync per call: a Python scale applies to DTensor and plain gradients alike.
    scale = min(1.0, max_norm / (total_norm.item() + 1e-6))
    if scale < 1.0:
        with torch.no_grad():
            for grad in grads:
                grad.mul_(scale)
    return total_norm


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def _layouts_of(model: nn.Module) -> dict[str, tuple[int, torch.Tensor, int]]:
    layouts = {}
    for prefix, module in model.named_modules():
        for name, layout in getattr(module, LAYOUT_ATTR, {}).items():
            layouts[f"{prefix}.{name}" if prefix else name] = layout
    return layouts


def gather_state_dict(model: nn.Module, *, device="cpu") -> dict[str, torch.Tensor]:
    """The single-process state dict of a model sharded by apply_fsdp or apply_tensor_parallel.

    Collective: every rank of the model's mesh must call it. DTensors are gathered
    (``full_tensor``) and the tensor-parallel row permutation is undone, so the result loads with
    ``load_state_dict`` into the unsharded model (same keys, shapes and values); tied weights
    stay one tensor. Tensors are moved to ``device``.
    """
    layouts = _layouts_of(model)
    gathered: dict[int, torch.Tensor] = {}
    result = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) in gathered:
            result[key] = gathered[id(value)]
            continue
        tensor = value.detach()
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        if key in layouts:
            dim, index, full_size = layouts[key]
            shape = list(tensor.shape)
            shape[dim] = full_size
            full = tensor.new_empty(shape)
            # Repeated rows (replicated segments) hold equal values; any copy will do.
            full.index_copy_(dim, index.to(tensor.device), tensor)
            tensor = full
        tensor = tensor.to(device)
        gathered[id(value)] = tensor
        result[key] = tensor
    return result


def save_pretrained_distributed(model: nn.Module, save_directory, **kwargs) -> None:
    """Gather a sharded MambaLMHeadModel and write it (rank 0) with models.checkpoint.save_pretrained;
    the directory then loads with MambaLMHeadModel.from_pretrained on one device. Collective."""
    from mamba_pkg.models.checkpoint import save_pretrained

    state_dict = gather_state_dict(model)
    if dist.get_rank() == 0:
        single = type(model)(model.config, device="meta")
        single.load_state_dict(state_dict, assign=True)
        if hasattr(single, "tie_weights"):
            single.tie_weights()
        save_pretrained(single, os.fspath(save_directory), **kwargs)
    dist.barrier()
