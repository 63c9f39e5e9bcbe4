"""Time and peak host memory to load a 1.4B-parameter checkpoint onto the GPU in bf16.

The model is mamba-1.4b's shape (d_model 2048, 48 Mamba-1 layers, vocab 50280, 1.37B
parameters) with random weights, saved first to a local directory in fp32 in both formats:
mamba_ssm's (config.json + pytorch_model.bin, tied weights stored once as torch.save does)
and ours (config.json + model.safetensors). Each load then runs in a fresh Python process,
which reports:

- ``ms``: wall time of ``MambaLMHeadModel.from_pretrained(dir, device="cuda", dtype=bfloat16)``
  (imports and CUDA context creation excluded, measured before the call);
- ``peak_rss_gb``: the peak resident set of that process (VmHWM in /proc/self/status,
  imports and CUDA context included); ``rss_before_load_gb`` is the same figure just before
  the call, so the difference is what loading added. (Not getrusage's ru_maxrss: Linux
  carries the parent's high-water mark across fork + exec, so a child started by a parent
  holding the 5 GiB model reported the parent's peak.)
- ``ok``: the loaded bf16 weights equal the saved fp32 weights rounded to bf16 (checked on
  several tensors after timing).

Providers: ``ours`` (both formats) and ``mamba_ssm`` (its own from_pretrained, .bin only)
when the anchor wheel is installed. The files were just written, so they are read from the
page cache (warm), the usual case on a machine that downloaded them once.

Usage: python benchmarks/bench_load.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import save_results, try_provider  # noqa: E402

MAMBA_1_4B = {"d_model": 2048, "n_layer": 48, "vocab_size": 50277, "ssm_cfg": {}, "rms_norm": True,
              "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8}
CHECKED = ["backbone.embedding.weight", "backbone.layers.0.mixer.in_proj.weight",
           "backbone.layers.47.mixer.A_log", "backbone.layers.23.mixer.dt_proj.bias", "backbone.norm_f.weight"]

CHILD = r"""
import json, sys, time
import torch


def peak_rss_gb():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmHWM"].split()[0]) / 2**20

provider, path, expected_path = sys.argv[1], sys.argv[2], sys.argv[3]
if provider == "ours":
    from mamba_pkg.models.lm import MambaLMHeadModel
else:
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
torch.zeros(1, device="cuda")
before = peak_rss_gb()
t0 = time.perf_counter()
model = MambaLMHeadModel.from_pretrained(path, device="cuda", dtype=torch.bfloat16)
torch.cuda.synchronize()
seconds = time.perf_counter() - t0
peak = peak_rss_gb()
state = model.state_dict()
expected = torch.load(expected_path)
ok = all(torch.equal(state[k].float().cpu(), v.to(state[k].dtype).float()) for k, v in expected.items())
ok = ok and all(t.is_cuda for t in state.values())
dtypes = sorted({str(t.dtype) for t in model.parameters()})
n_params = sum(p.numel() for p in model.parameters())
print("RESULT " + json.dumps({"ms": seconds * 1e3, "peak_rss_gb": peak, "rss_before_load_gb": before,
                              "ok": bool(ok), "param_dtypes": dtypes, "n_params": n_params,
                              "gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30}))
"""


def write_checkpoints(workdir: str) -> dict:
    """Random mamba-1.4b weights, saved in both formats; returns {format: dir} plus the checked tensors."""
    from mamba_pkg.models.config import MambaConfig
    from mamba_pkg.models.lm import MambaLMHeadModel

    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig.from_dict(MAMBA_1_4B), device="cuda")
    model.to("cpu")  # in place: the tied lm_head stays tied, so torch.save stores it once
    dirs = {"bin": os.path.join(workdir, "mamba_ssm_format"), "safetensors": os.path.join(workdir, "safetensors")}
    os.makedirs(dirs["bin"], exist_ok=True)
    with open(os.path.join(dirs["bin"], "config.json"), "w") as f:
        json.dump(MAMBA_1_4B, f)
    torch.save(model.state_dict(), os.path.join(dirs["bin"], "pytorch_model.bin"))
    model.save_pretrained(dirs["safetensors"])
    state = model.state_dict()
    expected = os.path.join(workdir, "expected.pt")
    torch.save({k: state[k].clone() for k in CHECKED}, expected)
    n_params = sum(p.numel() for p in model.parameters())
    del model, state
    return {"dirs": dirs, "expected": expected, "n_params": n_params}


def run_child(provider: str, path: str, expected: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", CHILD, provider, path, expected], capture_output=True, text=True,
                          env=env, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{provider} load failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=None, help="where the checkpoints are written (default: a temp dir)")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_load_")
    made = write_checkpoints(workdir)
    sizes = {fmt: sum(os.path.getsize(os.path.join(d, n)) for n in os.listdir(d)) / 2**30
             for fmt, d in made["dirs"].items()}
    print(f"params: {made['n_params'] / 1e9:.3f}B; checkpoint GiB: {sizes}")
    runs = [("ours", "bin"), ("ours", "safetensors"), ("mamba_ssm", "bin")]
    rows = []
    for provider, fmt in runs:
        result = try_provider(f"{provider} {fmt}",
                              lambda: run_child(provider, made["dirs"][fmt], made["expected"]))
        if result is None:
            continue
        result["peak_rss_gb"] = round(result["peak_rss_gb"], 3)
        result["rss_before_load_gb"] = round(result["rss_before_load_gb"], 3)
        rows.append({"case": f"load model=mamba-1.4b format={fmt} file_dtype=fp32 dtype=bf16 device=cuda cache=warm",
                     "provider": provider, "checkpoint_gb": round(sizes[fmt], 3), **result})
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    save_results("bench_load", rows)


if __name__ == "__main__":
    main()
