"""Loss curves of ours and mamba_ssm's MambaLMHeadModel trained from the same init on the same data.

Both models start from the same weights (ours is built with --seed, its state_dict is loaded
into mamba_ssm's: the parameter names are equal), see the same batches in the same order and
use the same loss (shifted next-token cross entropy, fp32 math), optimizer (AdamW, betas
(0.9, 0.95), weight decay 0.1 except A_log / D / dt_bias / norms / biases, as mamba_ssm marks
them) and schedule (linear warm-up, then constant), with gradients clipped to norm 1.

Data: a token stream from a fixed random Markov chain (seeded) over the first --data-vocab ids
(default 1024, so a 130m model learns it within 200 steps): each token has 4 possible
successors, so a model that learns the chain reaches log(4) = 1.386 nats. Batch at step s comes
from a generator seeded by (seed, s), so both runs see identical tokens.

Writes a JSON of both curves (and the per-step difference) and a PNG plot; prints the largest
absolute per-step loss difference. It asserts nothing: read the numbers.

    python examples/loss_curve.py                                    # GPU: mamba-130m, 200 steps
    python examples/loss_curve.py --model mamba2-130m --precision autocast
    python examples/loss_curve.py --steps 3 --tiny --no-anchor       # CPU smoke run of ours alone

Outputs go to --out-dir (default: $OUT if set, else benchmarks/results/) as loss_curve.json and
loss_curve.png (suffixed with --tag when given).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from mamba_pkg.models.config import MambaConfig
from mamba_pkg.models.lm import MambaLMHeadModel

SUCCESSORS = 4
MODELS = {
    "mamba-130m": {"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {"layer": "Mamba1"}},
    "mamba2-130m": {"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {"layer": "Mamba2"}},
    "hybrid-130m": {
        "d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {"layer": "Mamba2"},
        "attn_layer_idx": [7, 15], "attn_cfg": {"num_heads": 12},
    },
}
TINY = {"d_model": 64, "n_layer": 2, "vocab_size": 256, "ssm_cfg": {"layer": "Mamba1", "d_state": 8}}
RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="mamba-130m")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer d_model 64 model, vocab 256 (smoke runs, CPU)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=None, help="default 8 (4 with --tiny)")
    ap.add_argument("--seqlen", type=int, default=None, help="default 1024 (64 with --tiny)")
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-vocab", type=int, default=1024, help="the chain uses token ids [0, data_vocab)")
    ap.add_argument("--precision", choices=("fp32", "autocast"), default="fp32",
                    help="fp32 weights and math, or fp32 weights under torch.autocast(bf16)")
    ap.add_argument("--no-anchor", action="store_true", help="train ours only (no mamba_ssm)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    args.batch = args.batch or (4 if args.tiny else 8)
    args.seqlen = args.seqlen or (64 if args.tiny else 1024)
    return args


def model_config(args) -> dict:
    cfg = dict(TINY) if args.tiny else dict(MODELS[args.model])
    return {**cfg, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8}


class MarkovStream:
    """Batches of token ids from a fixed random Markov chain with SUCCESSORS successors per token."""

    def __init__(self, vocab_size: int, seqlen: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.vocab_size, self.seqlen, self.seed = vocab_size, seqlen, seed
        self.successors = torch.randint(0, vocab_size, (vocab_size, SUCCESSORS), generator=gen)  # (V, 4)

    def batch(self, step: int, rows: int) -> torch.Tensor:
        """(rows, seqlen) int64 on CPU; the same for every caller with the same step."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        ids = torch.empty(rows, self.seqlen, dtype=torch.long)
        ids[:, 0] = torch.randint(0, self.vocab_size, (rows,), generator=gen)
        choice = torch.randint(0, SUCCESSORS, (rows, self.seqlen), generator=gen)
        for t in range(1, self.seqlen):
            ids[:, t] = self.successors[ids[:, t - 1], choice[:, t]]
        return ids


def lm_loss(logits, ids):
    """Mean next-token cross entropy in fp32 (position t predicts ids[:, t + 1])."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def make_optimizer(model, lr):
    """AdamW; no weight decay on parameters marked _no_weight_decay and on 1-D parameters (norms, biases)."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if getattr(p, "_no_weight_decay", False) or p.dim() < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    # One fused kernel per step on CUDA: the per-parameter launches of the default made the
    # 130m run host-bound.
    fused = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def train(model, stream, args, device, on_progress=None) -> dict:
    """Train for args.steps; returns {"loss": [...], "tokens_per_s": float}.

    on_progress(losses so far) is called at every printed step, so that a run cut short keeps
    its curve."""
    model.train()
    opt = make_optimizer(model, args.lr)
    losses = []
    pending = []  # device scalars, read in batches (a .item() per step would sync every step)
    autocast = args.precision == "autocast"
    t_start = None
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        ids = stream.batch(step, args.batch).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(ids).logits
        loss = lm_loss(logits, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        pending.append(loss.detach())
        if step == 0:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_start = time.perf_counter()  # the first step includes autotuning
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            losses.extend(torch.stack(pending).tolist())
            pending.clear()
            print(f"  step {step:4d}  loss {losses[-1]:.4f}", flush=True)
            if on_progress is not None:
                on_progress(losses)
    elapsed = time.perf_counter() - t_start
    tokens_per_s = (args.steps - 1) * args.batch * args.seqlen / elapsed if args.steps > 1 else None
    return {"loss": losses, "tokens_per_s": tokens_per_s}


def build_ours(cfg, seed, device):
    torch.manual_seed(seed)
    return MambaLMHeadModel(MambaConfig(**cfg), device=device)


def build_mamba_ssm(cfg, ours):
    try:
        from mamba_ssm.models.config_mamba import MambaConfig as SsmConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel as SsmLM
    except ImportError as exc:
        raise SystemExit(f"mamba_ssm cannot be imported ({exc}); install the anchor wheel or pass --no-anchor") from exc

    model = SsmLM(SsmConfig(**cfg), device=ours.lm_head.weight.device)
    model.load_state_dict(ours.state_dict(), strict=True)
    # mamba_ssm marks the same parameters as ours; copy the marks so both optimizers group alike.
    marks = {n for n, p in ours.named_parameters() if getattr(p, "_no_weight_decay", False)}
    for name, p in model.named_parameters():
        if name in marks:
            p._no_weight_decay = True
    return model


def plot(path, curves, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax, ax_diff) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for name, losses in curves.items():
        ax.plot(range(len(losses)), losses, label=name, linestyle="-" if name == "ours" else "--")
    ax.axhline(math.log(SUCCESSORS), color="gray", linewidth=0.8, linestyle=":", label="log(4): chain entropy")
    ax.set_ylabel("training loss (nats)")
    ax.set_title(title)
    ax.legend()
    ax.grid(True, alpha=0.3)
    if "mamba_ssm" in curves:
        diff = [a - b for a, b in zip(curves["ours"], curves["mamba_ssm"])]
        ax_diff.plot(range(len(diff)), diff, color="tab:red")
    ax_diff.set_ylabel("ours - mamba_ssm")
    ax_diff.set_xlabel("step")
    ax_diff.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = model_config(args)
    stream = MarkovStream(min(args.data_vocab, cfg["vocab_size"]), args.seqlen, args.seed)
    name = "tiny" if args.tiny else args.model

    ours = build_ours(cfg, args.seed, device)
    theirs = None
    if not args.no_anchor:
        theirs = build_mamba_ssm(cfg, ours)  # before ours trains: the same init
    print(f"ours: {name}, {args.steps} steps, batch {args.batch} x {args.seqlen}, {args.precision}, {device}")
    runs = {}

    def progress(provider):
        def save(losses):
            partial = {**runs, provider: {"loss": list(losses), "tokens_per_s": None}}
            write_results(args, cfg, name, stream, device, partial, final=False)
        return save

    runs["ours"] = train(ours, stream, args, device, progress("ours"))
    del ours
    if theirs is not None:
        print("mamba_ssm:")
        runs["mamba_ssm"] = train(theirs, stream, args, device, progress("mamba_ssm"))
    return write_results(args, cfg, name, stream, device, runs, final=True)


def write_results(args, cfg, name, stream, device, runs, final):
    """loss_curve.json (+ .png when final); a partial file has "complete": false."""
    curves = {k: v["loss"] for k, v in runs.items()}
    doc = {
        "model": name,
        "config": cfg,
        "steps": args.steps,
        "batch": args.batch,
        "seqlen": args.seqlen,
        "lr": args.lr,
        "warmup": args.warmup,
        "seed": args.seed,
        "data_vocab": stream.vocab_size,
        "precision": args.precision,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else str(device),
        "torch": torch.__version__,
        "complete": final,
        "loss": curves,
        "tokens_per_s": {k: v["tokens_per_s"] for k, v in runs.items()},
    }
    if curves.get("mamba_ssm"):
        diff = [abs(a - b) for a, b in zip(curves["ours"], curves["mamba_ssm"])]
        doc["abs_diff"] = diff
        doc["max_abs_diff"] = max(diff)
        doc["final_loss"] = {k: v[-1] for k, v in curves.items()}
        if final:
            print(f"max |loss(ours) - loss(mamba_ssm)| over {args.steps} steps: {max(diff):.3e} "
                  f"(final {curves['ours'][-1]:.4f} vs {curves['mamba_ssm'][-1]:.4f})")
    out_dir = args.out_dir or os.environ.get("OUT") or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, "loss_curve" + (f"_{args.tag}" if args.tag else ""))
    with open(stem + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    if not final:
        return doc
    print(f"wrote {stem}.json")
    if plot(stem + ".png", curves, f"{name}, batch {args.batch} x {args.seqlen}, {args.precision}, {doc['device']}"):
        print(f"wrote {stem}.png")
    else:
        print("matplotlib is not installed: no plot")
    return doc


if __name__ == "__main__":
    main()
