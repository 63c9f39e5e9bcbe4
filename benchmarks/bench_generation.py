"""Decode speed: ours vs mamba_ssm ``generate(cg=True)`` (and transformers at 130m), same random weights.

bf16, prompt 128, 256 new tokens, greedy. Time per decode step =
(time of a 256-new-token generate - time of a 1-new-token generate) / 255, so the
prefill cancels out (median of --reps runs). Weight-read floor: every step reads all
weights once (bf16 bytes / 3.0 TB/s); pct_limit = floor / measured step time.

mamba_ssm's generate keeps the SSM states in the model dtype (bf16); ours keeps fp32 by
default. Case ``state=bf16`` compares like with like (ours with ssm_state_dtype=bf16);
case ``state=fp32`` is our default, its ``vs_mamba_ssm`` against mamba_ssm's bf16 run, timed as
graph replays unless --fp32-full.
``graph_ms``: one replay of the captured step alone (GPU time without the host loop; an idle GPU
waits for the launch, so this is above the GPU time per step inside a long generate).
``block_ms`` (ours, greedy): one replay of the 16-step graph that generate replays, per step.

    PYTHONPATH=. python benchmarks/bench_generation.py [--models mamba-130m,mamba2-130m] [--batches 1,64] [--quick]
    PYTHONPATH=. python benchmarks/bench_generation.py --tables profile.txt   (kernel tables of one step)
    PYTHONPATH=. python benchmarks/bench_generation.py --warmup --models mamba-1.4b   (compile only)
    PYTHONPATH=. python benchmarks/bench_generation.py --eager [--eager-profile prof.txt]   (eager steps)
--eager times one eager decode step (generate(cg=False)'s step: host-bound, every launch from Python)
per model and batch, in one process: ours with the cached direct launches (ops/_launch.py), ours with
Triton's own launch path (_launch.enabled = False), mamba_ssm's eager step, and our graph replay of the
same step; host_us_per_launch = the eager step's wall time / the kernels it launches. --eager-profile
appends a cProfile of our eager steps (direct launches) per model and batch to that file.
--warmup runs each model's decode paths once (ours and mamba_ssm, every batch size) and times nothing:
run one such process per model in parallel with a shared TRITON_CACHE_DIR (and TRITON_CACHE_AUTOTUNING=1)
before the timed run, so that the Triton compiles of all models overlap. --budget-s: start no model or
batch size after that many seconds (the rows so far are saved after every model).
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


def replay_ms(fn, reps: int = 50) -> float:
    """Median ms of fn() (one graph replay) timed with CUDA events."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def our_graph_ms(model, batch, ssm_state_dtype) -> float:
    from mamba_pkg.generation.decode import _decode_graph

    graph = _decode_graph(model, batch, PROMPT + NEW, torch.bfloat16, VOCAB, ssm_state_dtype)
    return replay_ms(graph.graph.replay)


def our_block_ms(model, batch, ssm_state_dtype) -> float | None:
    """ms per step of one replay of the multi-step greedy graph (captured by the timed generate)."""
    from mamba_pkg.generation.decode import GRAPH_STEPS, _decode_graph

    graph = _decode_graph(model, batch, PROMPT + NEW, torch.bfloat16, VOCAB, ssm_state_dtype)
    block = graph.blocks.get((GRAPH_STEPS, 0))
    return None if block is None else replay_ms(block.replay, reps=10) / GRAPH_STEPS


def their_graph_ms(model, batch) -> float:
    run = model._decoding_cache.callables[batch, 1]
    ids = torch.zeros(batch, 1, dtype=torch.long, device="cuda")
    return replay_ms(lambda: run(ids, ids, PROMPT))


def warmup_model(name: str, batches) -> None:
    """Compile what the timed run of ``name`` will launch: ours (the graphs, the multi-step one
    included, and the eager step of the kernel table) and mamba_ssm's generate, every batch size."""
    from mamba_pkg.generation.decode import GRAPH_STEPS

    ours = build_ours(name)
    theirs = try_provider("mamba_ssm build", lambda: build_mamba_ssm(name, ours))
    for batch in batches:
        ids = torch.randint(0, VOCAB, (batch, PROMPT), device="cuda")
        ours.generate(ids, max_new_tokens=GRAPH_STEPS + 2, cg=True, ssm_state_dtype=torch.bfloat16)
        eager_step("ours", ours, batch)()
        if theirs is not None:
            try_provider("mamba_ssm", lambda: theirs.generate(ids, max_length=PROMPT + 2, cg=True))
    torch.cuda.synchronize()
    print(f"warm {name}", flush=True)


def bench_model(name: str, batches, reps: int, with_transformers: bool, fp32_full: bool = False,
                tables: str | None = None, fp32: bool = True, deadline: float = float("inf")) -> list:
    """Rows for one model size: every batch size, every provider. Rows of ours and mamba_ssm
    carry ``kernels_per_step`` (one eager step under torch.profiler; the graph replays the same)."""
    ours = build_ours(name)
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in ours.parameters()}.values())
    floor_ms = weight_bytes / HBM_BYTES_PER_S * 1e3
    theirs = try_provider("mamba_ssm build", lambda: build_mamba_ssm(name, ours))
    hf = None
    if with_transformers and name == "mamba-130m":
        hf = try_provider("transformers build", lambda: _to_transformers(ours))
    rows = []
    for batch in batches:
        if time.perf_counter() > deadline:
            print(f"skipped {name} batch {batch}: --budget-s spent", flush=True)
            break
        ids = torch.randint(0, VOCAB, (batch, PROMPT), device="cuda")
        base = f"decode model={name} batch={batch} prompt={PROMPT} new={NEW}"
        runs = [  # (case, provider, make_fn, graph timing)
            (f"{base} state=bf16", "ours",
             lambda n, ids=ids: (lambda: ours.generate(ids, max_new_tokens=n, cg=True, ssm_state_dtype=torch.bfloat16)),
             lambda b=batch: our_graph_ms(ours, b, torch.bfloat16)),
        ]
        if fp32:
            runs.append((f"{base} state=fp32", "ours",
                         (lambda n, ids=ids: (lambda: ours.generate(ids, max_new_tokens=n, cg=True))) if fp32_full else None,
                         lambda b=batch: our_graph_ms(ours, b, None)))
        if theirs is not None:
            runs.append((f"{base} state=bf16", "mamba_ssm",
                         lambda n, ids=ids: (lambda: theirs.generate(ids, max_length=PROMPT + n, cg=True)),
                         lambda b=batch: their_graph_ms(theirs, b)))
        if hf is not None and batch == 1:
            runs.append((f"{base} state=fp32", "transformers",
                         lambda n, ids=ids: (lambda: hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)),
                         None))
        for case, provider, make_fn, graph_fn in runs:
            provider_reps = 1 if provider == "transformers" else reps
            if make_fn is None:  # timed as graph replays only
                ms = try_provider(f"{provider} graph", graph_fn)
                graph_fn = None
            else:
                ms = try_provider(provider, lambda make_fn=make_fn, r=provider_reps: step_ms(make_fn, r))
            if ms is None:
                continue
            row = {
                "case": case, "provider": provider,
                "ms": round(ms, 4), "floor_ms": round(floor_ms, 4), "gbps": round(weight_bytes / ms / 1e6, 1),
                "pct_limit": round(100 * floor_ms / ms, 1), "tokens_per_s": round(batch / ms * 1e3, 1),
            }
            if graph_fn is not None:
                graph_ms = try_provider(f"{provider} graph", graph_fn)
                if graph_ms is not None:
                    row["graph_ms"] = round(graph_ms, 4)
                if provider == "ours" and case.endswith("state=bf16"):
                    block_ms = try_provider("ours block", lambda b=batch: our_block_ms(ours, b, torch.bfloat16))
                    if block_ms is not None:
                        row["block_ms"] = round(block_ms, 4)
            else:
                row["timing"] = "graph replay" if provider == "ours" else "generate"
            if provider in ("ours", "mamba_ssm") and case.endswith("state=bf16"):
                model = ours if provider == "ours" else theirs
                prof = try_provider(f"{provider} profile", lambda m=model, p=provider: profile_step(eager_step(p, m, batch)))
                if prof is not None:
                    row["kernels_per_step"], row["kernel_us"] = prof[0], round(prof[1], 1)
                    if tables:
                        with open(tables, "a") as f:
                            f.write(f"== {provider} {case}: {prof[0]} kernels, {prof[1]:.0f} us\n{prof[2]}\n")
            rows.append(row)
            print(rows[-1], flush=True)
    theirs_ms = {r["case"].rsplit(" ", 1)[0]: r["ms"] for r in rows if r["provider"] == "mamba_ssm"}
    for r in rows:
        if r["provider"] == "ours" and r["case"].rsplit(" ", 1)[0] in theirs_ms:
            r["vs_mamba_ssm"] = round(theirs_ms[r["case"].rsplit(" ", 1)[0]] / r["ms"], 3)
    return rows


def eager_step(provider, model, batch):
    """One eager decode step of ``model`` (fresh cache with bf16 states, offset PROMPT), as a callable."""
    tokens = torch.randint(0, VOCAB, (batch,), device="cuda")
    if provider == "ours":
        from mamba_pkg.generation.decode import _new_cache, _step_eager

        params = _new_cache(model, batch, PROMPT + NEW, torch.bfloat16, torch.bfloat16)
        params.lengths_per_sample = torch.full((batch,), PROMPT, dtype=torch.int32, device="cuda")
        params.seqlen_offset = PROMPT
        return lambda: _step_eager(model, tokens, params, VOCAB)
    from mamba_ssm.utils.generation import InferenceParams as SsmParams

    params = SsmParams(max_seqlen=PROMPT + NEW, max_batch_size=batch, seqlen_offset=PROMPT)
    params.key_value_memory_dict = model.allocate_inference_cache(batch, PROMPT + NEW)
    return lambda: model(tokens[:, None], inference_params=params, num_last_tokens=1).logits


def eager_ms(step, steps: int) -> tuple[float, float]:
    """(wall ms per call of step over ``steps`` calls ended by a synchronize, host ms per call before it):
    an eager decode step is host-bound, so the wall time is the host's launch time."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return wall / steps * 1e3, host / steps * 1e3


def eager_rows(name: str, batches, steps: int, profile_file: str | None = None) -> list:
    """Rows ``step model=... batch=... state=bf16``: eager step ms of ours (direct launches; ``triton_path_ms``:
    Triton's launch path), our graph replay of the step (``graph_ms``), and mamba_ssm's eager step."""
    from mamba_pkg.ops import _launch

    ours = build_ours(name)
    theirs = try_provider("mamba_ssm build", lambda: build_mamba_ssm(name, ours))
    rows = []
    for batch in batches:
        case = f"step model={name} batch={batch} state=bf16"
        step = eager_step("ours", ours, batch)
        kernels = profile_step(step)[0]
        graph = try_provider("ours graph", lambda: our_graph_ms(ours, batch, torch.bfloat16))
        timings = {}
        for direct in (True, False, True):  # direct twice: its spread is the A/B's noise
            _launch.enabled = direct
            timings.setdefault(direct, []).append(eager_ms(step, steps))
        _launch.enabled = True
        (wall, host), (wall2, _) = timings[True]
        row = {"case": case, "provider": "ours", "ms": round(wall, 4), "host_ms": round(host, 4),
               "repeat_ms": round(wall2, 4), "triton_path_ms": round(timings[False][0][0], 4),
               "graph_ms": None if graph is None else round(graph, 4), "kernels_per_step": kernels,
               "host_us_per_launch": round(wall / kernels * 1e3, 1)}
        if graph:
            row["eager_vs_graph"] = round(wall / graph, 2)
        rows.append(row)
        print(row, flush=True)
        if profile_file:
            _cprofile(step, steps, profile_file, f"ours eager {case}")
        if theirs is not None:
            their_step = eager_step("mamba_ssm", theirs, batch)
            their = try_provider("mamba_ssm eager", lambda: eager_ms(their_step, steps))
            if their is not None:
                kernels = try_provider("mamba_ssm profile", lambda: profile_step(their_step)[0])
                rows.append({"case": case, "provider": "mamba_ssm", "ms": round(their[0], 4),
                             "host_ms": round(their[1], 4), "kernels_per_step": kernels})
                row["vs_mamba_ssm"] = round(their[0] / wall, 3)
                print(rows[-1], flush=True)
    return rows


def _cprofile(step, steps: int, path: str, title: str) -> None:
    """Append cProfile's tables (by own time, by cumulative time) of ``steps`` calls of step to ``path``."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)
    with open(path, "a") as f:
        f.write(f"== {title}: {steps} steps\n{text.getvalue()}\n")


def profile_step(step):
    """(kernels launched by one call of step, their GPU time in us, torch.profiler's table)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    table = prof.key_averages().table(sort_by="device_time_total", row_limit=14, max_name_column_width=70)
    return len(kernels), sum(e.device_time for e in kernels), table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--tables", metavar="FILE", help="write torch.profiler's kernel table of one step per row here")
    ap.add_argument("--fp32-full", action="store_true",
                    help="time the fp32-state case by generate too (default: its graph replay only)")
    ap.add_argument("--no-fp32", action="store_true", help="skip the fp32-state case (our default states)")
    ap.add_argument("--warmup", action="store_true", help="compile only (see the module docstring); times nothing")
    ap.add_argument("--budget-s", type=float, default=float("inf"),
                    help="start no model / batch size after this many seconds")
    ap.add_argument("--eager", action="store_true", help="time eager steps (see the module docstring)")
    ap.add_argument("--eager-steps", type=int, default=30, help="--eager: steps per timing")
    ap.add_argument("--eager-profile", metavar="FILE", help="--eager: append cProfile tables of our eager steps here")
    ap.add_argument("--tag", default="", help="--eager: results file bench_generation_eager<tag>.json")
    ap.add_argument("--quick", action="store_true",
                    help="mamba-1.4b and mamba2-1.3b only, no transformers (fits 120 s on an H100)")
    args = ap.parse_args()
    if args.quick:
        args.models, args.no_transformers = "mamba-1.4b,mamba2-1.3b", True
    batches = [int(b) for b in args.batches.split(",")]
    if args.warmup:
        for name in args.models.split(","):
            warmup_model(name, batches)
        return
    deadline = time.perf_counter() + args.budget_s
    rows = []
    if args.eager:
        for name in args.models.split(","):
            if time.perf_counter() > deadline:
                print(f"skipped {name}: --budget-s spent", flush=True)
                continue
            rows += eager_rows(name, batches, args.eager_steps, args.eager_profile)
            torch.cuda.empty_cache()
            save_results("bench_generation_eager" + args.tag, rows, plot_key="batch")
        return
    for name in args.models.split(","):
        if time.perf_counter() > deadline:
            print(f"skipped {name}: --budget-s spent", flush=True)
            continue
        rows += bench_model(name, batches, args.reps, not args.no_transformers, args.fp32_full, args.tables,
                            not args.no_fp32, deadline)
        torch.cuda.empty_cache()
        # Saved after every model, so that a run cut short by a time limit keeps its rows.
        save_results("bench_generation", rows, plot_key="batch")


def _to_transformers(ours):
    from mamba_pkg.models.checkpoint import to_transformers

    return to_transformers(ours)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
