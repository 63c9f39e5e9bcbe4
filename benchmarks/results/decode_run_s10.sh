#!/bin/bash
# decode session 10, the one device call (bash benchmarks/results/decode_run_s10.sh in build/iso_decode): GPU tests of the decode files, bench_generation
# (4 models, batch 1 / 64, same process as mamba_ssm's generate(cg=True)), then sweep_decode: the kernel table of one
# captured b64 step per model (timeline) and the whole-step b64 A/B of the session-10 settings (model).
cd "$(dirname "$0")/../.."
export PYTHONPATH=. PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tc TRITON_CACHE_AUTOTUNING=1
L=$OUT/decode_s10_log.txt
T0=$(date +%s)
python3 -m pip install -q --no-deps --no-index ../../.anchors/*.whl > /dev/null 2>&1
{ python3 -c "import mamba_ssm; print('mamba_ssm', mamba_ssm.__version__)" 2>&1 | tail -1
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader; } | tee $L
M="mamba2-1.3b mamba-1.4b mamba2-130m mamba-130m"
# Phase 1 (compiles in parallel, one shared Triton cache): each model's bench paths, each model's A/B settings, tests.
for m in $M; do timeout 85 python3 benchmarks/bench_generation.py --warmup --models $m --batches 1,64 > /tmp/warm_$m.log 2>&1 & done
for m in $M; do timeout 85 python3 benchmarks/sweep_decode.py --parts model --compile-only --models $m > /tmp/cc_$m.log 2>&1 & done
timeout 85 python3 -m pytest -q -p no:cacheprovider tests/ops/test_decode_linear.py > /tmp/t1.log 2>&1 &
timeout 85 python3 -m pytest -q -p no:cacheprovider tests/ops/test_ssm_decode_step.py tests/ops/test_conv_xproj_step.py tests/ops/test_state_update.py tests/ops/test_greedy_argmax.py > /tmp/t2.log 2>&1 &
timeout 85 python3 -m pytest -q -p no:cacheprovider tests/generation/test_decode.py -k cuda > /tmp/t3.log 2>&1 &
wait
{ echo "== phase 1 $(( $(date +%s) - T0 )) s"
  for f in /tmp/t1.log /tmp/t2.log /tmp/t3.log; do echo "== $f"; grep -E "^(FAILED|ERROR)|^E  " $f | head -8; tail -n 2 $f; done
  for m in $M; do echo "== warm $m: $(tail -n 1 /tmp/warm_$m.log) | compile-only: $(tail -n 1 /tmp/cc_$m.log)"; done; } >> $L 2>&1
# Phase 2: the issue-7 numbers.
timeout 90 python3 benchmarks/bench_generation.py --no-transformers --no-fp32 --reps 2 --batches 1,64 --budget-s 72 \
  --models mamba2-1.3b,mamba-1.4b,mamba2-130m,mamba-130m 2>&1 | grep -v -i warn >> $L
echo "== phase 2 $(( $(date +%s) - T0 )) s" >> $L
# Phase 3: where the b64 step goes, and the A/B.
timeout 55 python3 benchmarks/sweep_decode.py --parts timeline,model --no-anchor --budget-s 42 2>&1 | grep -v -i warn >> $L
echo "== total $(( $(date +%s) - T0 )) s" >> $L
tail -c 11000 $L
