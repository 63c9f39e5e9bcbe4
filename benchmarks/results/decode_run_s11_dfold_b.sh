#!/bin/bash
# dfold, session 11, device call 2 (bash benchmarks/results/decode_run_s11_dfold_b.sh in build/iso_dfold): GPU tests of
# the in-kernel dt projection (ssm_decode_step.DT_DOT_ROWS), the whole-step b64 A/B of Mamba-1 (sweep_decode model part,
# graph replay, same process), then bench_generation b64 of mamba-130m / mamba-1.4b against mamba_ssm (same process).
cd "$(dirname "$0")/../.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tc TRITON_CACHE_AUTOTUNING=1
L=$OUT/dfold_b_log.txt
T0=$(date +%s)
{ python3 -c "import mamba_ssm; print('mamba_ssm', mamba_ssm.__version__)" 2>&1 | tail -1
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader; } | tee $L
M="mamba-130m mamba-1.4b"
for m in $M; do timeout 100 python3 benchmarks/bench_generation.py --warmup --models $m --batches 64 > /tmp/warm_$m.log 2>&1 & done
for m in $M; do timeout 100 python3 benchmarks/sweep_decode.py --parts model --compile-only --models $m > /tmp/cc_$m.log 2>&1 & done
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/ops/test_ssm_decode_step.py > /tmp/t1.log 2>&1 &
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/generation/test_decode.py -k "cuda or dot_step" tests/models/test_mamba.py > /tmp/t2.log 2>&1 &
wait
{ echo "== phase 1 $(( $(date +%s) - T0 )) s"
  for f in /tmp/t1.log /tmp/t2.log; do echo "== $f"; grep -E "^(FAILED|ERROR)|^E  " $f | head -8; tail -n 2 $f; done
  for m in $M; do echo "== warm $m: $(tail -n 1 /tmp/warm_$m.log) | compile-only: $(tail -n 1 /tmp/cc_$m.log)"; done; } >> $L 2>&1
timeout 80 python3 benchmarks/sweep_decode.py --parts model --budget-s 60 2>&1 | grep -v -i warn >> $L
echo "== phase 2 $(( $(date +%s) - T0 )) s" >> $L
timeout 120 python3 benchmarks/bench_generation.py --no-transformers --no-fp32 --reps 2 --batches 64 --budget-s 90 \
  --models mamba-130m,mamba-1.4b 2>&1 | grep -v -i warn >> $L
echo "== total $(( $(date +%s) - T0 )) s" >> $L
tail -c 11000 $L
