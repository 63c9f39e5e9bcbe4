#!/bin/bash
# dfold, session 11, device call 1 (bash benchmarks/results/decode_run_s11_dfold_a.sh in build/iso_dfold): GPU tests of
# the add + RMSNorm fold, the whole-step b64 A/B (sweep_decode model part: fold on / off, graph replay, same process),
# and the consumer side of fold 2 (Mamba-1 x_proj partials summed by ssm_decode_step at 64 rows against the x_proj
# launch + the SSM step of today).
cd "$(dirname "$0")/../.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tc TRITON_CACHE_AUTOTUNING=1
L=$OUT/dfold_a_log.txt
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader; python3 -c "import triton, torch; print(triton.__version__, torch.__version__)"; } | tee $L
M="mamba-130m mamba2-130m mamba-1.4b mamba2-1.3b"
# Phase 1 (compiles in parallel, one Triton cache): each model's A/B settings, the tests.
for m in $M; do timeout 100 python3 benchmarks/sweep_decode.py --parts model --compile-only --models $m > /tmp/cc_$m.log 2>&1 & done
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/ops/test_decode_linear.py -k "gpu" > /tmp/t1.log 2>&1 &
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/models/test_block.py tests/ops/test_ssm_decode_step.py > /tmp/t2.log 2>&1 &
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/generation/test_decode.py -k "cuda or dot_step or fused_step" > /tmp/t3.log 2>&1 &
wait
{ echo "== phase 1 $(( $(date +%s) - T0 )) s"
  for f in /tmp/t1.log /tmp/t2.log /tmp/t3.log; do echo "== $f"; grep -E "^(FAILED|ERROR)|^E  " $f | head -8; tail -n 2 $f; done
  for m in $M; do echo "== compile-only $m: $(tail -n 2 /tmp/cc_$m.log | tr '\n' ' ')"; done; } >> $L 2>&1
# Phase 2: the whole-step A/B.
timeout 150 python3 benchmarks/sweep_decode.py --parts model --budget-s 130 2>&1 | grep -v -i warn >> $L
echo "== phase 2 $(( $(date +%s) - T0 )) s" >> $L
# Phase 3: fold 2's consumer at 64 rows: ssm_decode_step summing S = D / BLOCK_N x_proj partials (in-kernel dt_proj,
# as split_sum does) against today's x_proj (tl.dot) + ssm_decode_step (dt_proj by the tl.dot kernel, then the kernel).
timeout 60 python3 - >> $L 2>&1 <<'PY'
import torch
from benchmarks.sweep_decode import graph_ms, ssm_inputs
from mamba_pkg.ops import decode_linear as dl, ssm_decode_step as sds
with torch.inference_mode():
    for name, dim, rank, block_n in (("mamba-130m", 1536, 48, 32), ("mamba-1.4b", 4096, 128, 64)):
        kw = ssm_inputs(dim, rank, 64, split=True, block_d=block_n)
        split = graph_ms(lambda: sds.ssm_decode_step(**kw, split_sum=True))
        kw = ssm_inputs(dim, rank, 64, split=False)
        xw = torch.randn(rank + 32, dim, device="cuda", dtype=torch.bfloat16) / dim**0.5
        def chain():
            x_dbl = dl.decode_linear(kw["x"], xw)
            return sds.ssm_decode_step(**{**kw, "dt": x_dbl[:, :rank], "B": x_dbl[:, rank:rank + 16], "C": x_dbl[:, rank + 16:]})
        today, ssm = graph_ms(chain), graph_ms(lambda: sds.ssm_decode_step(**kw))
        print(f"fold2 {name} b64 S={dim // block_n}: split_sum step {split * 1e3:.2f} us | x_proj + step {today * 1e3:.2f} us"
              f" | step alone (dt_proj + kernel) {ssm * 1e3:.2f} us", flush=True)
PY
echo "== total $(( $(date +%s) - T0 )) s" >> $L
tail -c 11000 $L
