#!/bin/bash
# Decode, session 6, second H100 call: whole-step A/B (sweep_decode MODEL_AB, one CUDA-graph replay of the
# captured step, ms) of the code after round 1 (2D batch-1 product, evict_first, no L2 prefetch).
# Compile each model's settings in parallel (--compile-only), then time one at a time.
export PYTHONPATH=. PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tcache
T0=$(date +%s)
pids=""
for m in mamba-1.4b mamba2-1.3b; do
    timeout 100 python3 benchmarks/sweep_decode.py --parts model --models $m --compile-only > /tmp/c_$m 2>&1 & pids="$pids $!"
done
wait $pids
echo "compile phase $(( $(date +%s) - T0 )) s"; for f in /tmp/c_*; do tail -n 2 $f; done
timeout 100 python3 benchmarks/sweep_decode.py --parts model --budget-s 80 2>&1 | grep -E "^step|took|Error"
echo "total $(( $(date +%s) - T0 )) s"
