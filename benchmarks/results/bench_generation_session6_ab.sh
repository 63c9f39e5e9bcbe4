#!/bin/bash
# Decode, session 6, first H100 call: whole-step A/B at batch 1 (mamba-1.4b, mamba2-1.3b), one CUDA-graph
# replay of the captured step, ms. build/decode_old (carried, git-ignored) = `git archive 7771553 mamba_pkg` without assets
# (the session-5 decode code) for the same-machine old vs new comparison.
# Phase 1 (parallel): compile each model's settings (sweep_decode --compile-only) and warm the old code.
# Phase 2 (one at a time): sweep_decode model A/B (new code), then the old code's replays.
export PYTHONPATH=. PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tcache
T0=$(date +%s)
cat > /tmp/old.py <<'PY'
import os, sys, time
import torch
from benchmarks import bench_generation as bg
torch.set_grad_enabled(False)
name = sys.argv[1]
m = bg.build_ours(name)
bg.our_graph_ms(m, 1, torch.bfloat16)
import mamba_pkg
print(name, "old warm", mamba_pkg.__file__, flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.1)
for _ in range(2):
    print(f"step {name} b1 OLD code graph ms {bg.our_graph_ms(m, 1, torch.bfloat16):.4f}", flush=True)
open(sys.argv[2] + ".done", "w").close()
PY
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/ops/test_decode_linear.py tests/ops/test_ssm_decode_step.py \
    -k "gpu or cuda" > /tmp/tests 2>&1 &
pids=""
for m in mamba-1.4b mamba2-1.3b; do
    timeout 100 python3 benchmarks/sweep_decode.py --parts model --models $m --compile-only > /tmp/c_$m 2>&1 & pids="$pids $!"
done
rm -f /tmp/go1 /tmp/go2
PYTHONPATH=build/decode_old:. timeout 200 python3 /tmp/old.py mamba-1.4b /tmp/go1 > /tmp/old1 2>&1 &
PYTHONPATH=build/decode_old:. timeout 200 python3 /tmp/old.py mamba2-1.3b /tmp/go2 > /tmp/old2 2>&1 &
wait $pids
echo "compile phase $(( $(date +%s) - T0 )) s"; tail -2 /tmp/c_*
timeout 80 python3 benchmarks/sweep_decode.py --parts model --budget-s 60 2>&1 | grep -E "^step|took|Error"
touch /tmp/go1; while [ ! -e /tmp/go1.done ] && [ $(( $(date +%s) - T0 )) -lt 190 ]; do sleep 0.2; done
touch /tmp/go2; wait
cat /tmp/old1 /tmp/old2 | grep -E "^step|warm|Error"
wait; echo "== GPU tests"; tail -3 /tmp/tests
echo "total $(( $(date +%s) - T0 )) s"
