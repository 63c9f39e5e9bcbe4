#!/bin/bash
# decode session 9, call 1: GPU tests + gemm64 sweep + whole-step b64 A/B (iso tree)
cd "$(dirname "$0")"
export PYTHONPATH=. PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-index ../../.anchors/*.whl 2>&1 | tail -1
python3 -c "import mamba_ssm; print('mamba_ssm', mamba_ssm.__version__)"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
T0=$(date +%s)
# compile phase (nothing timed) in parallel, GPU tests beside it
for i in 0 1 2 3 4 5 6 7 8 9; do
  timeout 70 python3 benchmarks/sweep_decode.py --parts gemm --gemm-shapes $i --compile-only > $OUT/compile_gemm_$i.log 2>&1 &
done
for m in mamba2-130m mamba-130m mamba2-1.3b mamba-1.4b; do
  timeout 70 python3 benchmarks/sweep_decode.py --parts model --models $m --compile-only > $OUT/compile_model_$m.log 2>&1 &
done
timeout 70 python3 -m pytest -q -x tests/ops/test_decode_linear.py tests/ops/test_ssm_decode_step.py tests/ops/test_conv_xproj_step.py tests/ops/test_state_update.py tests/ops/test_greedy_argmax.py > $OUT/tests_ops.log 2>&1 &
timeout 70 python3 -m pytest -q tests/generation/test_decode.py -k "mamba1_dot or fused_step or routes" > $OUT/tests_gen.log 2>&1 &
wait
echo "compile+tests $(( $(date +%s) - T0 )) s"; tail -3 $OUT/tests_ops.log; tail -3 $OUT/tests_gen.log
grep -l "failed\|Error" $OUT/compile_*.log | head; grep -h "failed" $OUT/compile_*.log | head -5
timeout 70 python3 benchmarks/sweep_decode.py --parts model --budget-s 50 2>&1 | grep -v Warning
mkdir -p $OUT/m && mv $OUT/sweep_decode* $OUT/m/ 2>/dev/null
timeout 60 python3 benchmarks/sweep_decode.py --parts gemm --budget-s 45 2>&1 | grep -v Warning
echo "total $(( $(date +%s) - T0 )) s"
