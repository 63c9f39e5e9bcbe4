"""Tiny multi-GPU training loop: FSDP2 or tensor parallel, prints loss and tokens/s.

    torchrun --nproc_per_node 2 examples/train_distributed.py --fsdp --model 370m --batch 8 --seqlen 2048
    torchrun --nproc_per_node 2 examples/train_distributed.py --tp --model 370m --batch 8 --seqlen 2048
    python examples/train_distributed.py --model 370m --batch 16 --seqlen 2048      # 1-GPU baseline
    torchrun --nproc_per_node 2 examples/train_distributed.py --tp --model tiny --device cpu --steps 5

Data: synthetic token sequences from a fixed random Markov chain (each token has 4 possible
successors, so the loss falls towards log(4) = 1.386), or --data FILE (flat uint16 token ids).
Batches come from one global stream seeded by the step: with --fsdp data rank r trains on rows
[r * batch, (r + 1) * batch) of a global batch of batch * data_ranks rows, so a 1-GPU run with
--batch (batch * data_ranks) sees the same tokens and gives the same loss curve. With --tp every
rank of a TP group takes the same rows (the model, not the data, is split). --fsdp --tp: a
(world / tp_size, tp_size) mesh, TP inside each group of --tp-size ranks, FSDP across groups.

--dtype bf16: torch.autocast(bf16) over fp32 weights in every mode (so FSDP, TP and 1-GPU runs
compute alike); add --fsdp-bf16-params to have FSDP all-gather bf16 weights instead
(MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): half the all-gather traffic).
--json FILE writes the per-step losses and the mean tokens/s (after --warmup steps) from rank 0;
--compare-to FILE prints the largest per-step loss difference and the tokens/s ratio against
such a file. The 2-GPU acceptance run (issue 9):

    python examples/train_distributed.py --model 370m --layer Mamba1 --batch 16 --seqlen 2048 --json one16.json
    python examples/train_distributed.py --model 370m --layer Mamba1 --batch 8 --seqlen 2048 --json one8.json
    torchrun --nproc_per_node 2 examples/train_distributed.py --fsdp --model 370m --layer Mamba1 --batch 8 \
        --seqlen 2048 --compare-to one16.json       # same loss curve; then --compare-to one8.json: >= 1.8x
    torchrun --nproc_per_node 2 examples/train_distributed.py --tp --model 370m --layer Mamba1 --batch 8 \
        --seqlen 2048 --compare-to one8.json        # same loss curve; speed ratio recorded
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from mamba_pkg.distributed import (
    apply_fsdp,
    apply_tensor_parallel,
    save_pretrained_distributed,
)
from mamba_pkg.models.config import MambaConfig
from mamba_pkg.models.lm import MambaLMHeadModel

# mamba_ssm model sizes (d_model, n_layer); vocab as GPT-NeoX.
PRESETS = {
    "tiny": {"d_model": 64, "n_layer": 2, "vocab_size": 256},
    "130m": {"d_model": 768, "n_layer": 24, "vocab_size": 50277},
    "370m": {"d_model": 1024, "n_layer": 48, "vocab_size": 50277},
    "790m": {"d_model": 1536, "n_layer": 48, "vocab_size": 50277},
}
SUCCESSORS = 4


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 over the data-parallel ranks (sharded weights)")
    parser.add_argument("--tp", action="store_true", help="tensor parallel over all ranks (with --fsdp: over --tp-size)")
    parser.add_argument("--tp-size", type=int, default=2, help="with --fsdp and --tp: ranks per TP group (2-D mesh)")
    parser.add_argument("--model", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--layer", choices=("Mamba1", "Mamba2"), default="Mamba2")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step per rank (--tp: per step)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the tokens/s mean")
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fsdp-bf16-params", action="store_true", help="FSDP MixedPrecisionPolicy instead of autocast")
    parser.add_argument("--checkpointing", action="store_true", help="recompute block activations in backward")
    parser.add_argument("--data", help="flat uint16 token file (default: synthetic Markov chain)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=1)
    parser.add_argument("--save", help="directory for the gathered checkpoint (loads with from_pretrained)")
    parser.add_argument("--json", help="rank 0 writes losses and tokens/s here")
    parser.add_argument("--compare-to", help="--json file of another run (e.g. 1 GPU): print loss gap and speed ratio")
    return parser.parse_args()


class Batches:
    """Global batches by step: synthetic Markov chain or windows of a token file."""

    def __init__(self, vocab_size, seqlen, data=None, seed=0):
        self.vocab_size, self.seqlen, self.seed = vocab_size, seqlen, seed
        self.tokens = None if data is None else np.memmap(data, dtype=np.uint16, mode="r")
        generator = torch.Generator().manual_seed(seed)
        self.successors = torch.randint(0, vocab_size, (vocab_size, SUCCESSORS), generator=generator)

    def __call__(self, step, rows):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        if self.tokens is not None:
            starts = torch.randint(0, len(self.tokens) - self.seqlen, (rows,), generator=generator)
            return torch.stack([torch.from_numpy(self.tokens[s : s + self.seqlen].astype(np.int64)) for s in starts.tolist()])
        ids = torch.empty(rows, self.seqlen, dtype=torch.long)
        ids[:, 0] = torch.randint(0, self.vocab_size, (rows,), generator=generator)
        choice = torch.randint(0, SUCCESSORS, (rows, self.seqlen), generator=generator)
        for t in range(1, self.seqlen):
            ids[:, t] = self.successors[ids[:, t - 1], choice[:, t]]
        return ids


def main():
    args = parse_args()
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    if (args.fsdp or args.tp) and not distributed:
        raise SystemExit("--fsdp / --tp need torchrun (e.g. torchrun --nproc_per_node 2 ...)")

    ssm_cfg = {"layer": args.layer}
    config = MambaConfig(**PRESETS[args.model], ssm_cfg=ssm_cfg)
    # Same seed on every rank: identical initial weights (TP scatters / broadcasts from rank 0 anyway).
    torch.manual_seed(args.seed)
    model = MambaLMHeadModel(config, device=device)
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    bf16 = args.dtype == "bf16"
    tp_size = (args.tp_size if args.fsdp else world) if args.tp else 1
    if world % tp_size != 0:
        raise SystemExit(f"--tp-size {tp_size} must divide the number of ranks {world}")
    data_ranks, data_rank = (world // tp_size, rank // tp_size) if args.fsdp else (1, 0)
    if args.fsdp or args.tp:
        mesh = init_device_mesh(args.device, (data_ranks, tp_size), mesh_dim_names=("dp", "tp"))
    if args.tp:
        apply_tensor_parallel(model, mesh["tp"])
    if args.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        use_policy = bf16 and args.fsdp_bf16_params
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if use_policy else None
        apply_fsdp(model, mesh["dp"], mp_policy=policy)
    autocast = bf16 and not (args.fsdp and args.fsdp_bf16_params)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    batches = Batches(config.vocab_size, args.seqlen, args.data, args.seed)

    tokens_per_step = args.batch * data_ranks * args.seqlen
    losses, rates = [], []
    n_params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        mode = "fsdp+tp" if args.fsdp and args.tp else "fsdp" if args.fsdp else "tp" if args.tp else "single"
        print(f"mode={mode} world={world} model={args.model} layer={args.layer} params={n_params / 1e6:.1f}M "
              f"batch={args.batch} seqlen={args.seqlen} dtype={args.dtype} device={args.device}", flush=True)
    for step in range(args.steps):
        ids = batches(step, args.batch * data_ranks)
        if args.fsdp:
            ids = ids[data_rank * args.batch : (data_rank + 1) * args.batch]
        ids = ids.to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        if args.fsdp:
            dist.all_reduce(loss, group=mesh["dp"].get_group())
            loss = loss / data_ranks
        loss = loss.item()  # also waits for the step to finish
        elapsed = time.perf_counter() - start
        losses.append(loss)
        rates.append(tokens_per_step / elapsed)
        if rank == 0 and (step % args.log_every == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss:.4f}  tokens/s {rates[-1]:,.0f}  ({rates[-1] / world:,.0f} per rank)", flush=True)
    first = args.warmup if args.warmup < len(rates) else 0
    mean_rate = float(np.mean(rates[first:]))
    if rank == 0:
        print(f"mean tokens/s {mean_rate:,.0f} over steps {first}..{len(rates) - 1}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "world": world, "params": n_params, "losses": losses,
                           "tokens_per_s": mean_rate, "tokens_per_s_per_rank": mean_rate / world}, f, indent=1)
        if args.compare_to:
            with open(args.compare_to) as f:
                other = json.load(f)
            steps = min(len(losses), len(other["losses"]))
            gap = max(abs(a - b) for a, b in zip(losses[:steps], other["losses"][:steps]))
            print(f"vs {args.compare_to}: max |loss difference| over {steps} steps {gap:.4f}, "
                  f"tokens/s ratio {mean_rate / other['tokens_per_s']:.2f}x", flush=True)
    if args.save:
        if distributed and (args.fsdp or args.tp):
            save_pretrained_distributed(model, args.save)
        elif rank == 0:
            model.save_pretrained(args.save)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
