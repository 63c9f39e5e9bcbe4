#!/bin/bash
# decode session 9, call 2: whole-step b64 A/B of the tl.dot paths + decode op GPU tests (iso tree)
cd "$(dirname "$0")"
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
T0=$(date +%s)
for m in mamba2-1.3b mamba-1.4b mamba2-130m mamba-130m; do
  timeout 55 python3 benchmarks/sweep_decode.py --parts model --models $m --compile-only > /tmp/compile_$m.log 2>&1 &
done
timeout 55 python3 -m pytest -q -x tests/ops/test_decode_linear.py tests/ops/test_ssm_decode_step.py tests/ops/test_conv_xproj_step.py tests/ops/test_state_update.py tests/ops/test_greedy_argmax.py > /tmp/tests_ops.log 2>&1 &
timeout 55 python3 -m pytest -q tests/generation/test_decode.py -k "mamba1_dot or fused_step or routes" > /tmp/tests_gen.log 2>&1 &
wait
echo "compile+tests $(( $(date +%s) - T0 )) s"
for m in mamba2-1.3b mamba-1.4b mamba2-130m mamba-130m; do tail -2 /tmp/compile_$m.log | grep -i "error\|failed"; done
grep -E "^E |FAILED|passed|failed" /tmp/tests_ops.log | head -12; grep -E "^E |FAILED|passed|failed" /tmp/tests_gen.log | head -8
timeout 70 python3 benchmarks/sweep_decode.py --parts model --budget-s 58 > /tmp/ab.log 2>&1
cp /tmp/ab.log /tmp/tests_ops.log $OUT/ 2>/dev/null
grep -E "^step |failed|Error" /tmp/ab.log | cut -c1-120
echo "total $(( $(date +%s) - T0 )) s"
