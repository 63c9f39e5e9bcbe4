"""Decode speed: ours vs mamba_ssm ``generate(cg=True)`` (and transformers at 130m), same random weights.

bf16, prompt 128, 256 new tokens, greedy. Time per decode step =
(time of a 256-new-token generate - time of a 1-new-token generate) / 255, so the
prefill cancels out. Weight-read floor: every step reads all weights once
(bf16 bytes / 3.0 TB/s); pct_limit = floor / measured step time.

    PYTHONPATH=. python benchmarks/bench_generation.py [--models mamba-130m,mamba2-130m] [--batches 1,64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import HBM_BYTES_PER_S, save_results, try_provider

PROMPT, NEW = 128, 256
VOCAB = 50277
MODELS = {
    "mamba-130m": dict(d_model=768, n_layer=24, ssm_cfg={"layer": "Mamba1"}),
    "mamba-1.4b": dict(d_model=2048, n_layer=48, ssm_cfg={"layer": "Mamba1"}),
    "mamba2-130m": dict(d_model=768, n_layer=24, ssm_cfg={"layer": "Mamba2"}),
    "mamba2-1.3b": dict(d_model=2048, n_layer=48, ssm_cfg={"layer": "Mamba2"}),
}
COMMON = dict(vocab_size=VOCAB, rms_norm=True, residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8)


def _seconds(fn, reps: int) -> float:
    """Median wall time of fn() in s. A generate call is one long host loop (hundreds of ms),
    so host timing with a synchronize is accurate; do_bench's many repeats would not fit the budget."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_ms(make_fn, reps: int) -> float:
    """make_fn(new_tokens) -> a callable generating that many tokens; returns ms per decode step."""
    full = _seconds(make_fn(NEW), reps)
    one = _seconds(make_fn(1), reps)
    return (full - one) / (NEW - 1) * 1e3


def build_ours(name):
    from mamba_pkg.models.config import MambaConfig
    from mamba_pkg.models.lm import MambaLMHeadModel

    torch.manual_seed(0)
    return MambaLMHeadModel(MambaConfig(**MODELS[name], **COMMON), device="cuda", dtype=torch.bfloat16).eval()


def build_mamba_ssm(name, ours):
    from mamba_ssm.models.config_mamba import MambaConfig as SsmConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel as SsmLM

    model = SsmLM(SsmConfig(**MODELS[name], **COMMON), device="cuda", dtype=torch.bfloat16).eval()
    model.load_state_dict(ours.state_dict())
    return model


def bench_model(name: str, batches, reps: int, with_transformers: bool) -> list:
    """Rows for one model size: every batch size, every provider."""
    ours = build_ours(name)
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in ours.parameters()}.values())
    floor_ms = weight_bytes / HBM_BYTES_PER_S * 1e3
    theirs = try_provider("mamba_ssm build", lambda: build_mamba_ssm(name, ours))
    hf = None
    if with_transformers and name == "mamba-130m":
        hf = try_provider("transformers build", lambda: _to_transformers(ours))
    rows = []
    for batch in batches:
        ids = torch.randint(0, VOCAB, (batch, PROMPT), device="cuda")
        providers = {"ours": lambda n, ids=ids: (lambda: ours.generate(ids, max_new_tokens=n, cg=True))}
        if theirs is not None:
            providers["mamba_ssm"] = lambda n, ids=ids: (lambda: theirs.generate(ids, max_length=PROMPT + n, cg=True))
        if hf is not None and batch == 1:
            providers["transformers"] = lambda n, ids=ids: (
                lambda: hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            )
        for provider, make_fn in providers.items():
            provider_reps = 1 if provider == "transformers" else reps
            ms = try_provider(provider, lambda make_fn=make_fn, r=provider_reps: step_ms(make_fn, r))
            if ms is None:
                continue
            rows.append({
                "case": f"decode model={name} batch={batch} prompt={PROMPT} new={NEW}", "provider": provider,
                "ms": round(ms, 4), "floor_ms": round(floor_ms, 4), "gbps": round(weight_bytes / ms / 1e6, 1),
                "pct_limit": round(100 * floor_ms / ms, 1), "tokens_per_s": round(batch / ms * 1e3, 1),
            })
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-transformers", action="store_true")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, batches, args.reps, not args.no_transformers)
        torch.cuda.empty_cache()
        # Saved after every model, so that a run cut short by a time limit keeps its rows.
        save_results("bench_generation", rows, plot_key="batch")


def _to_transformers(ours):
    from mamba_pkg.models.checkpoint import to_transformers

    return to_transformers(ours)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
