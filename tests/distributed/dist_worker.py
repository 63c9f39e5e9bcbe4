"""Runs every distributed check in 2 CPU processes (gloo) and writes the measured errors as JSON.

    python tests/distributed/dist_worker.py OUT.json [CHECK ...] [--world 2 | 4] [--device cpu | cuda]

Each check builds a tiny model from a fixed seed (identical on every rank), runs it in one
process as the reference, shards a copy (FSDP2 or tensor parallel) and compares outputs and
gathered gradients. Rank 0 writes {check: {"values": {what: relative error (or message)},
"error": traceback or None}}; tests/distributed/test_distributed.py asserts on it. One spawn for all checks
keeps the start-up cost (two interpreters importing torch) paid once.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import tempfile
import traceback
from functools import partial

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

D_MODEL = 32
VOCAB = 64
SEQLEN = 21  # not a multiple of the Mamba2 chunk size (8)
MAMBA2_CFG = {"headdim": 8, "d_state": 8, "chunk_size": 8}


def rel_err(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _full_grads(model):
    """{param name: single-process-layout gradient}; also checks that the rows every rank holds
    whole (replicated segments) got equal gradients on every rank."""
    from mamba_pkg.distributed import _layouts_of

    layouts = _layouts_of(model)
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        if grad is None:
            continue
        if isinstance(grad, DTensor):
            grad = grad.full_tensor()
        if name in layouts:
            dim, index, full_size = layouts[name]
            shape = list(grad.shape)
            shape[dim] = full_size
            index = index.to(grad.device)
            full = grad.new_zeros(shape).index_copy_(dim, index, grad)
            if not torch.equal(full.index_select(dim, index), grad):
                raise AssertionError(f"{name}: the copies of a replicated segment have different gradients")
            grad = full
        grads[name] = grad
    return grads


def _compare_grads(errors, ref_model, grads):
    for name, param in ref_model.named_parameters():
        if param.grad is None:
            continue
        errors[f"grad {name}"] = rel_err(grads[name], param.grad)


def _forward_backward(module, x, weight=None, **kwargs):
    x = x.clone().requires_grad_(True)
    out = module(x, **kwargs)
    weight = torch.randn_like(out) if weight is None else weight
    (out * weight).sum().backward()
    return out, x.grad, weight


def _tp_module_check(mesh, build, x_shape, *, packed=False):
    """Output, input gradient and parameter gradients of a TP copy vs the module itself, and the
    gathered state dict; with packed, also a packed (cu_seqlens) batch."""
    from mamba_pkg.distributed import apply_tensor_parallel, gather_state_dict

    torch.manual_seed(0)
    ref = build()
    x = torch.randn(*x_shape)
    tp = apply_tensor_parallel(copy.deepcopy(ref), mesh)
    out_ref, dx_ref, weight = _forward_backward(ref, x)
    out_tp, dx_tp, _ = _forward_backward(tp, x, weight)
    errors = {"output": rel_err(out_tp, out_ref), "input grad": rel_err(dx_tp, dx_ref)}
    _compare_grads(errors, ref, _full_grads(tp))
    state = gather_state_dict(tp)
    for key, value in ref.state_dict().items():
        errors[f"state {key}"] = rel_err(state[key], value)
    if packed:
        cu_seqlens = torch.tensor([0, 7, 13, SEQLEN], dtype=torch.int32)
        x = torch.randn(1, SEQLEN, x_shape[-1])
        out_ref, dx_ref, weight = _forward_backward(ref, x, cu_seqlens=cu_seqlens)
        out_tp, dx_tp, _ = _forward_backward(tp, x, weight, cu_seqlens=cu_seqlens)
        errors["packed output"] = rel_err(out_tp, out_ref)
        errors["packed input grad"] = rel_err(dx_tp, dx_ref)
    return errors


def check_tp_gated_mlp(mesh):
    from mamba_pkg.models.mlp import GatedMLP

    return _tp_module_check(mesh, lambda: GatedMLP(D_MODEL, hidden_features=48, bias=True, multiple_of=16), (2, SEQLEN, D_MODEL))


def check_tp_mha(mesh):
    from mamba_pkg.models.attention import MHA

    build = partial(MHA, D_MODEL, num_heads=4, num_heads_kv=2, mlp_dim=64, d_conv=3, rotary_emb_dim=4, layer_idx=0)
    return _tp_module_check(mesh, build, (2, SEQLEN, D_MODEL), packed=True)


def check_tp_mamba(mesh):
    from mamba_pkg.models.mamba import Mamba

    build = lambda: Mamba(D_MODEL, d_state=8, bias=True, layer_idx=0)
    return _tp_module_check(mesh, build, (2, SEQLEN, D_MODEL), packed=True)


def check_tp_mamba2_ngroups1(mesh):
    """ngroups == 1: B/C replicated on every rank, norm statistics all-reduced."""
    from mamba_pkg.models.mamba2 import Mamba2

    return _tp_module_check(mesh, lambda: Mamba2(D_MODEL, **MAMBA2_CFG, layer_idx=0), (2, SEQLEN, D_MODEL), packed=True)


def check_tp_mamba2_ngroups2(mesh):
    """ngroups == 2: groups split over the ranks; fused (mem-eff) path; bias on both projections."""
    from mamba_pkg.models.mamba2 import Mamba2

    build = lambda: Mamba2(D_MODEL, ngroups=2, bias=True, D_has_hdim=True, **MAMBA2_CFG, layer_idx=0)
    return _tp_module_check(mesh, build, (2, SEQLEN, D_MODEL), packed=True)


def check_tp_mamba2_mlp(mesh):
    """d_ssm < d_inner (in-mixer MLP part), ngroups == 2, unfused path."""
    from mamba_pkg.models.mamba2 import Mamba2

    build = lambda: Mamba2(D_MODEL, ngroups=2, d_ssm=48, **MAMBA2_CFG, layer_idx=0)
    return _tp_module_check(mesh, build, (2, SEQLEN, D_MODEL))


def _lm_config(layer="Mamba2", attn=True, d_intermediate=48):
    from mamba_pkg.models.config import MambaConfig

    ssm_cfg = {"layer": layer, **(MAMBA2_CFG if layer == "Mamba2" else {"d_state": 8})}
    return MambaConfig(
        d_model=D_MODEL,
        n_layer=3 if attn else 2,
        d_intermediate=d_intermediate,
        vocab_size=VOCAB,
        ssm_cfg=ssm_cfg,
        attn_layer_idx=[1] if attn else [],
        attn_cfg={"num_heads": 4, "num_heads_kv": 2, "rotary_emb_dim": 4},
    )


def _train_step(model, ids, clip, lr=0.5, max_norm=0.1):
    """One clipped SGD step; returns the gradient norm before clipping. SGD: the update is linear
    in the gradient, so rounding-level gradient differences stay rounding-level (Adam's
    g / sqrt(v) amplifies them where g is near 0)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model(ids, labels=ids).loss.backward()
    norm = clip(model, max_norm)
    opt.step()
    return norm


def _torch_clip(model, max_norm):
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def _shared_tmpdir(stack):
    """A temporary directory made by rank 0, same path on every rank (one host)."""
    path = [stack.enter_context(tempfile.TemporaryDirectory()) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    return path[0]


def _dcp_round_trip(errors, sharded, fresh, ids):
    """torch.distributed.checkpoint: save the sharded state, load it into a differently
    initialised model sharded the same way; logits must match."""
    import torch.distributed.checkpoint as dcp

    with contextlib.ExitStack() as stack:
        path = _shared_tmpdir(stack)
        dcp.save(sharded.state_dict(), checkpoint_id=path)
        state = fresh.state_dict()
        dcp.load(state, checkpoint_id=path)
        fresh.load_state_dict(state)
        with torch.no_grad():
            errors["dcp reloaded logits"] = rel_err(fresh(ids).logits, sharded(ids).logits)
        dist.barrier()


def check_tp_lm(mesh):
    """Hybrid LM (Mamba2 + MHA + GatedMLP): loss, logits, gradients, one clipped SGD step, then the
    gathered checkpoint loaded into a single-process model gives the same logits."""
    from mamba_pkg.distributed import (
        apply_tensor_parallel,
        clip_grad_norm_,
        gather_state_dict,
        save_pretrained_distributed,
    )
    from mamba_pkg.models.lm import MambaLMHeadModel

    torch.manual_seed(0)
    ref = MambaLMHeadModel(_lm_config())
    tp = apply_tensor_parallel(copy.deepcopy(ref), mesh)
    ids = torch.randint(0, VOCAB, (2, SEQLEN))
    out_ref = ref(ids, labels=ids)
    out_ref.loss.backward()
    out_tp = tp(ids, labels=ids)
    out_tp.loss.backward()
    errors = {"loss": rel_err(out_tp.loss, out_ref.loss), "logits": rel_err(out_tp.logits, out_ref.logits)}
    _compare_grads(errors, ref, _full_grads(tp))
    ref.zero_grad(set_to_none=True)
    tp.zero_grad(set_to_none=True)
    norm_ref = _train_step(ref, ids, _torch_clip)
    errors["grad norm"] = rel_err(_train_step(tp, ids, clip_grad_norm_), norm_ref)
    state = gather_state_dict(tp)
    for key, value in ref.state_dict().items():
        errors[f"after step {key}"] = rel_err(state[key], value)
    single = MambaLMHeadModel(_lm_config())
    single.load_state_dict(state)
    with torch.no_grad():
        errors["reloaded logits"] = rel_err(single(ids).logits, tp(ids).logits)
    with contextlib.ExitStack() as stack:
        path = _shared_tmpdir(stack)
        save_pretrained_distributed(tp, path)
        if dist.get_rank() == 0:
            loaded = MambaLMHeadModel.from_pretrained(path).to(ids.device)
            with torch.no_grad():
                errors["from_pretrained logits"] = rel_err(loaded(ids).logits, single(ids).logits)
        dist.barrier()
    return errors


def check_tp_lm_mamba1(mesh):
    """Mamba-1 LM with gradient checkpointing (the TP mixers are recomputed in backward): loss
    and gradients; then a torch.distributed.checkpoint round trip of the sharded weights."""
    from mamba_pkg.distributed import apply_tensor_parallel
    from mamba_pkg.models.lm import MambaLMHeadModel

    torch.manual_seed(0)
    ref = MambaLMHeadModel(_lm_config("Mamba1", attn=False, d_intermediate=0))
    tp = apply_tensor_parallel(copy.deepcopy(ref), mesh)
    tp.gradient_checkpointing_enable()
    ids = torch.randint(0, VOCAB, (2, SEQLEN))
    out_ref = ref(ids, labels=ids)
    out_ref.loss.backward()
    out_tp = tp(ids, labels=ids)
    out_tp.loss.backward()
    errors = {"loss": rel_err(out_tp.loss, out_ref.loss)}
    _compare_grads(errors, ref, _full_grads(tp))
    torch.manual_seed(1)
    fresh = apply_tensor_parallel(MambaLMHeadModel(_lm_config("Mamba1", attn=False, d_intermediate=0)), mesh)
    _dcp_round_trip(errors, tp, fresh, ids)
    return errors


def check_fsdp_lm(mesh):
    """FSDP2: each rank takes its half of the batch; the averaged loss, gathered gradients, one
    clipped SGD step and the gathered state dict equal the single-process full-batch run; then a
    torch.distributed.checkpoint round trip."""
    from mamba_pkg.distributed import apply_fsdp, clip_grad_norm_, gather_state_dict
    from mamba_pkg.models.lm import MambaLMHeadModel

    torch.manual_seed(0)
    ref = MambaLMHeadModel(_lm_config())
    sharded = apply_fsdp(copy.deepcopy(ref), mesh)
    world, rank = mesh.size(), mesh.get_local_rank()
    ids = torch.randint(0, VOCAB, (2 * world, SEQLEN))
    mine = ids.chunk(world)[rank]
    out_ref = ref(ids, labels=ids)
    out_ref.loss.backward()
    out = sharded(mine, labels=mine)
    out.loss.backward()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    errors = {"loss": rel_err(loss / world, out_ref.loss)}
    _compare_grads(errors, ref, _full_grads(sharded))
    ref.zero_grad(set_to_none=True)
    sharded.zero_grad(set_to_none=True)
    norm_ref = _train_step(ref, ids, _torch_clip)
    errors["grad norm"] = rel_err(_train_step(sharded, mine, clip_grad_norm_), norm_ref)
    state = gather_state_dict(sharded)
    for key, value in ref.state_dict().items():
        errors[f"after step {key}"] = rel_err(state[key], value)
    single = MambaLMHeadModel(_lm_config())
    single.load_state_dict(state)
    with torch.no_grad():
        errors["reloaded logits"] = rel_err(single(ids).logits, ref(ids).logits)
    torch.manual_seed(1)
    _dcp_round_trip(errors, sharded, apply_fsdp(MambaLMHeadModel(_lm_config()), mesh), ids)
    return errors


def check_fsdp_tp_2d_lm(mesh):
    """(dp=2, tp=2) mesh: TP inside each dp group, FSDP across them. Loss, gradients, clipped
    step and gathered state equal the single-process full-batch run."""
    from mamba_pkg.distributed import (
        apply_fsdp,
        apply_tensor_parallel,
        clip_grad_norm_,
        gather_state_dict,
    )
    from mamba_pkg.models.lm import MambaLMHeadModel

    torch.manual_seed(0)
    ref = MambaLMHeadModel(_lm_config())
    model = apply_tensor_parallel(copy.deepcopy(ref), mesh["tp"])
    apply_fsdp(model, mesh["dp"])
    dp = mesh["dp"].size()
    ids = torch.randint(0, VOCAB, (2 * dp, SEQLEN))
    mine = ids.chunk(dp)[mesh["dp"].get_local_rank()]
    out_ref = ref(ids, labels=ids)
    out_ref.loss.backward()
    out = model(mine, labels=mine)
    out.loss.backward()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss, group=mesh["dp"].get_group())
    errors = {"loss": rel_err(loss / dp, out_ref.loss)}
    _compare_grads(errors, ref, _full_grads(model))
    ref.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    norm_ref = _train_step(ref, ids, _torch_clip)
    errors["grad norm"] = rel_err(_train_step(model, mine, clip_grad_norm_), norm_ref)
    state = gather_state_dict(model)
    for key, value in ref.state_dict().items():
        errors[f"after step {key}"] = rel_err(state[key], value)
    return errors


def check_tp_errors(mesh):
    """Sizes the TP size does not divide: ValueError naming the size, model left unsharded."""
    from mamba_pkg.distributed import apply_tensor_parallel
    from mamba_pkg.models.attention import MHA
    from mamba_pkg.models.mamba2 import Mamba2

    messages = {}
    cases = {
        "mamba2 nheads": lambda: Mamba2(24, headdim=8, d_state=8, expand=1),  # 3 heads
        "mamba2 ngroups": lambda: Mamba2(48, headdim=8, d_state=8, ngroups=3, expand=1),  # 6 heads, 3 groups
        "mha kv heads": lambda: MHA(D_MODEL, num_heads=4, num_heads_kv=1),
    }
    for what, build in cases.items():
        module = build()
        try:
            apply_tensor_parallel(module, mesh)
        except ValueError as exc:
            messages[what] = str(exc)
            messages[what + " untouched"] = not any(isinstance(p, DTensor) for p in module.parameters())
        else:
            messages[what] = None
    return messages


def check_tp_generate(mesh):
    """Greedy generation (prefill in chunks, cached steps) of TP LMs equals the single process:
    same tokens, same scores. Hybrid Mamba2 + MHA + GatedMLP, and Mamba-1."""
    from mamba_pkg.distributed import apply_tensor_parallel
    from mamba_pkg.generation.decode import generate
    from mamba_pkg.models.lm import MambaLMHeadModel

    errors = {}
    for name, config in (("hybrid", _lm_config()), ("mamba1", _lm_config("Mamba1", attn=False, d_intermediate=0))):
        torch.manual_seed(0)
        ref = MambaLMHeadModel(config).eval()
        tp = apply_tensor_parallel(copy.deepcopy(ref), mesh)
        prompt = torch.randint(0, VOCAB, (2, 7))
        outputs = []
        for model in (ref, tp):
            with torch.no_grad():
                outputs.append(generate(model, prompt, max_new_tokens=6, prefill_chunk_size=4,
                                        output_scores=True, return_dict_in_generate=True))
        errors[f"{name} tokens differ"] = float((outputs[0].sequences != outputs[1].sequences).sum())
        errors[f"{name} scores"] = rel_err(torch.stack(outputs[1].scores), torch.stack(outputs[0].scores))
    return errors


def check_misuse_errors(mesh):
    """Misuse: a 2-D mesh for TP, FSDP on a model without Blocks. Each gives its exception type
    name and message."""
    from mamba_pkg.distributed import apply_fsdp, apply_tensor_parallel
    from mamba_pkg.models.mamba import Mamba

    mesh_2d = init_device_mesh(mesh.device_type, (1, mesh.size()), mesh_dim_names=("dp", "tp"))
    cases = {
        "2-D mesh": lambda: apply_tensor_parallel(Mamba(D_MODEL, d_state=8), mesh_2d),
        "no blocks": lambda: apply_fsdp(Mamba(D_MODEL, d_state=8), mesh),
    }
    messages = {}
    for what, call in cases.items():
        try:
            call()
        except Exception as exc:  # noqa: BLE001 -- the test checks the type name
            messages[what] = f"{type(exc).__name__}: {exc}"
        else:
            messages[what] = None
    return messages


CHECKS = [
    check_tp_gated_mlp,
    check_tp_mha,
    check_tp_mamba,
    check_tp_mamba2_ngroups1,
    check_tp_mamba2_ngroups2,
    check_tp_mamba2_mlp,
    check_tp_lm,
    check_tp_lm_mamba1,
    check_fsdp_lm,
    check_tp_generate,
    check_tp_errors,
    check_misuse_errors,
]


CHECKS_2D = [check_fsdp_tp_2d_lm]


def _worker(rank, world, port, out_path, only, device):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "cuda":
        # Models, inputs and indices of the checks are created on this rank's GPU.
        torch.cuda.set_device(rank)
        torch.set_default_device(f"cuda:{rank}")
        dist.init_process_group("nccl", rank=rank, world_size=world)
    else:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
    if world == 4:
        mesh, checks = init_device_mesh(device, (2, 2), mesh_dim_names=("dp", "tp")), CHECKS_2D
    else:
        mesh, checks = init_device_mesh(device, (world,)), CHECKS
    results = {}
    for check in checks:
        name = check.__name__[len("check_"):]
        if only and name not in only:
            continue
        try:
            results[name] = {"values": check(mesh), "error": None}
        except Exception:  # noqa: BLE001 -- reported to the test, which fails with the traceback
            results[name] = {"values": {}, "error": traceback.format_exc()}
        dist.barrier()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("only", nargs="*", help="check names (default: all)")
    parser.add_argument("--world", type=int, choices=(2, 4), default=2, help="4: the (dp=2, tp=2) checks")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: nccl, one GPU per rank, Triton")
    args = parser.parse_args()
    # The CPU run uses the torch reference ops; on GPUs the default backend (Triton) runs.
    if args.device == "cpu":
        os.environ["MAMBA_PKG_BACKEND"] = "torch"
    mp.spawn(_worker, args=(args.world, _free_port(), args.out, args.only, args.device), nprocs=args.world)
