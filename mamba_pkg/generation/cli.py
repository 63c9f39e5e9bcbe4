"""`mamba-generate`: generate text from a prompt, streaming it to the terminal.

    mamba-generate "ROMEO:" --max-new-tokens 100
    mamba-generate "The capital of France is" --model state-spaces/mamba-130m --device cuda
    python -m mamba_pkg.generation.cli "..."

Without --model it uses the small model embedded in the package (mamba_pkg/assets),
so it works offline on a CPU. The text goes to stdout; the speed line to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import torch

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mamba-generate", description="Generate text with a Mamba language model, streaming it as it is produced.",
    )
    p.add_argument("prompt", help="the text to continue")
    p.add_argument("--model", default=ASSETS_DIR,
                   help="Hub name (e.g. state-spaces/mamba-130m) or local directory (default: the embedded model)")
    p.add_argument("--tokenizer", default=None, help="tokenizer name or directory (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--max-length", type=int, default=None, help="total length, prompt included (instead of --max-new-tokens)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0, help="1 = greedy, 0 = off")
    p.add_argument("--top-p", type=float, default=0.9, help="0 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--cg", action=argparse.BooleanOptionalAction, default=None,
                   help="CUDA-graph decoding (default: on with a CUDA device, off on a CPU; --no-cg: eager decode "
                        "steps, which are bound by Python launch overhead on a GPU, 10-40x slower per token)")
    p.add_argument("--no-eos", action="store_true", help="do not stop at the end-of-text token")
    return p


def _device(parser, name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        parser.error(f"--device: unknown device {name!r} (expected cpu, cuda, cuda:N, ...)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device: {name!r} asked for, but CUDA is not available here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device: {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        parser.error(f"--device: {name!r} is not supported (expected cpu or cuda[:N])")
    return device


def encode(tokenizer, text: str) -> list:
    """Token ids of ``text`` for a tokenizers.Tokenizer or a transformers tokenizer."""
    out = tokenizer.encode(text)
    return list(out.ids) if hasattr(out, "ids") else list(out)


def eos_id(tokenizer) -> Optional[int]:
    """The end-of-text id of the tokenizer, if it has one."""
    value = getattr(tokenizer, "eos_token_id", None)
    if isinstance(value, int):
        return value
    token_to_id = getattr(tokenizer, "token_to_id", None)
    if callable(token_to_id):
        for name in ("<|endoftext|>", "</s>", "<eos>"):
            found = token_to_id(name)
            if found is not None:
                return int(found)
    return None


def use_graphs(cg: Optional[bool], device: torch.device) -> bool:
    """--cg / --no-cg, or by default: CUDA-graph decoding on a CUDA device (an eager GPU decode step is
    host-bound), eager steps on a CPU."""
    return device.type == "cuda" if cg is None else cg


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.prompt.strip():
        parser.error("prompt: empty; give some text to continue")
    if args.max_new_tokens < 1 and args.max_length is None:
        parser.error(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    device = _device(parser, args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.cg and device.type != "cuda":
        parser.error("--cg: CUDA graphs need --device cuda")
    cg = use_graphs(args.cg, device)

    from mamba_pkg.generation.decode import generate
    from mamba_pkg.generation.streamer import TextStreamer
    from mamba_pkg.models.checkpoint import load_pretrained, load_tokenizer
    from mamba_pkg.models.lm import MambaLMHeadModel

    try:
        model = load_pretrained(MambaLMHeadModel, args.model, dtype=dtype, device=device)
        tokenizer = load_tokenizer(args.tokenizer or args.model)
    except (OSError, ValueError) as exc:
        parser.error(f"--model {args.model!r}: cannot load: {exc}")
    model.eval()

    ids = encode(tokenizer, args.prompt)
    if not ids:
        parser.error("prompt: the tokenizer turned it into no tokens")
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    generator = None
    if args.seed is not None:
        torch.manual_seed(args.seed)
        generator = torch.Generator(device=device).manual_seed(args.seed)
    streamer = TextStreamer(tokenizer)
    t0 = time.perf_counter()
    try:
        out = generate(
            model, input_ids, max_length=args.max_length,
            max_new_tokens=None if args.max_length is not None else args.max_new_tokens,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
            repetition_penalty=args.repetition_penalty, eos_token_id=None if args.no_eos else eos_id(tokenizer),
            streamer=streamer, cg=cg, generator=generator, return_dict_in_generate=True, enable_timing=True,
        )
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    seconds = time.perf_counter() - t0
    new_tokens = out.sequences.shape[1] - input_ids.shape[1]
    decode_s = out.timings.get("decode_ms", 0.0) / 1e3
    # The first new token comes from the prefill; the decode loop makes the others.
    decode_rate = f"{(new_tokens - 1) / decode_s:.1f} tokens/s decoding" if new_tokens > 1 and decode_s > 0 else "-"
    print(f"[{new_tokens} tokens in {seconds:.2f} s ({new_tokens / max(seconds, 1e-9):.1f} tokens/s overall, "
          f"{decode_rate}; prompt {input_ids.shape[1]} tokens in {out.timings.get('prefill_ms', 0.0):.0f} ms; "
          f"{device}, {str(dtype).replace('torch.', '')}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
