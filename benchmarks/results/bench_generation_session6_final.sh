#!/bin/bash
# Decode, session 6, final H100 call (carry [".anchors"]), within ~80 s of wall time:
# phase 1 (parallel, <= 40 s): GPU tests of the decode ops and the generation CUDA tests; --warmup of the
# four models (ours + mamba_ssm, shared Triton cache); phase 2: bench_generation vs mamba_ssm, same process,
# the larger models first (rows saved after every model).
export PYTHONPATH=. PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tcache TRITON_CACHE_AUTOTUNING=1
T0=$(date +%s)
L=/tmp/logs; mkdir -p $L
timeout 40 python3 -m pytest -q -p no:cacheprovider tests/ops/test_decode_linear.py tests/ops/test_ssm_decode_step.py \
    tests/ops/test_conv_xproj_step.py -k "gpu or cuda" > $L/t_ops 2>&1 &
timeout 40 python3 -m pytest -q -p no:cacheprovider tests/generation/test_decode.py -k "cuda" > $L/t_gen 2>&1 &
python3 -m pip install -q --no-deps --no-index .anchors/*.whl > $L/pip 2>&1
python3 -c "import mamba_ssm" || echo "mamba_ssm did not install"
for m in mamba-1.4b mamba2-1.3b mamba2-130m mamba-130m; do
    timeout $(( 40 - $(date +%s) + T0 )) python3 benchmarks/bench_generation.py --warmup --models $m > $L/w_$m 2>&1 &
done
wait
echo "phase 1 $(( $(date +%s) - T0 )) s"
timeout $(( 78 - $(date +%s) + T0 )) python3 benchmarks/bench_generation.py \
    --models mamba-1.4b,mamba2-1.3b,mamba2-130m,mamba-130m --no-transformers --no-fp32 --reps 2 \
    --budget-s $(( 62 - $(date +%s) + T0 )) > $L/bench 2>&1
grep -E "^decode|skipped|Error" $L/bench | tail -30
for f in $L/t_ops $L/t_gen; do echo "== $f"; grep -E "passed|failed|error|FAILED" $f | tail -5; done
for f in $L/w_*; do echo "== $f"; tail -n 1 $f; done
echo "total $(( $(date +%s) - T0 )) s"
