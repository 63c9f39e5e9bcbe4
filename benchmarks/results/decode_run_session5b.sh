#!/bin/bash
# Decode, session 5 round 2: the one H100 call (run from the repo root, carry [".anchors"]; an untracked
# old4/ holds `git archive 15beb64 mamba_pkg` = the session-4 decode code, for the same-machine A/B).
# 1. compile phase, in parallel: GPU tests of the decode files, --warmup per model (shared Triton cache),
#    the sweep's B variants, the session-4 and the current code's mamba-1.4b b1 generate (each waits for
#    its go file before timing).
# 2. timed, one at a time: session-4 code vs now (mamba-1.4b b1, ms per step from generate), bench_generation
#    vs mamba_ssm (1.3b / 1.4b first), sweep_decode's whole-step A/B (NORM_PREPASS on/off ...).
python3 -m pip install -q --no-deps --no-index .anchors/*.whl
python3 -c "import mamba_ssm" || echo "mamba_ssm did not install"
export PYTHONPATH=. PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tcache TRITON_CACHE_AUTOTUNING=1
L=${OUT:-/tmp}/logs
mkdir -p "$L"
T0=$(date +%s)
# ab.py LABEL GO [PATH]: mamba-1.4b b1 ms per step from generate, the package from PATH if given.
cat > /tmp/ab.py <<'PY'
import os, sys, time
import torch
if len(sys.argv) > 3:
    sys.path.insert(0, sys.argv[3])
import mamba_pkg
from benchmarks import bench_generation as bg
torch.set_grad_enabled(False)
m = bg.build_ours("mamba-1.4b")
ids = torch.randint(0, bg.VOCAB, (1, bg.PROMPT), device="cuda")
fn = lambda n: (lambda: m.generate(ids, max_new_tokens=n, cg=True, ssm_state_dtype=torch.bfloat16))
fn(40)()
torch.cuda.synchronize()
print(sys.argv[1], "warm", mamba_pkg.__file__, flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.1)
for _ in range(2):
    print(sys.argv[1], "mamba-1.4b b1 ms/step", round(bg.step_ms(fn, 3), 4), flush=True)
PY
# The sweep's B variants, compiled here so that the timed sweep only captures and replays.
cat > /tmp/variants.py <<'PY'
import torch
import mamba_pkg.ops.decode_linear as dl
from benchmarks import bench_generation as bg
torch.set_grad_enabled(False)
for name, attr, value in (("mamba-1.4b", "NORM_PREPASS", False), ("mamba2-1.3b", "NORM_PREPASS", False),
                          ("mamba2-1.3b", "NUM_WARPS", 8), ("mamba2-1.3b", "BLOCK_N", 8)):
    m = bg.build_ours(name)
    old = getattr(dl, attr)
    setattr(dl, attr, value)
    bg.eager_step("ours", m, 1)()
    setattr(dl, attr, old)
    del m
torch.cuda.synchronize()
print("variants compiled", flush=True)
PY
pids=""
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/ops/test_decode_linear.py > $L/t1 2>&1 & pids="$pids $!"
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/ops/test_conv_xproj_step.py tests/ops/test_ssm_decode_step.py > $L/t2 2>&1 & pids="$pids $!"
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/generation/test_decode.py -k "cuda and not pdl" > $L/t3 2>&1 & pids="$pids $!"
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/generation/test_decode.py -k "pdl" > $L/t4 2>&1 & pids="$pids $!"
for m in mamba2-1.3b mamba-1.4b mamba2-130m mamba-130m; do
    timeout 110 python3 benchmarks/bench_generation.py --warmup --models $m > $L/w_$m 2>&1 & pids="$pids $!"
done
timeout 110 python3 /tmp/variants.py > $L/variants 2>&1 & pids="$pids $!"
rm -f /tmp/go_old /tmp/go_new
timeout 200 python3 /tmp/ab.py session4 /tmp/go_old old4 > $L/ab_old 2>&1 & old=$!
timeout 200 python3 /tmp/ab.py now /tmp/go_new > $L/ab_new 2>&1 & new=$!
wait $pids
echo "compile phase $(( $(date +%s) - T0 )) s"
touch /tmp/go_old; wait $old; touch /tmp/go_new; wait $new
cat $L/ab_old $L/ab_new | grep -v Warning
echo "a/b done $(( $(date +%s) - T0 )) s"
timeout 100 python3 benchmarks/bench_generation.py --models mamba2-1.3b,mamba-1.4b,mamba2-130m,mamba-130m \
    --no-transformers --no-fp32 --reps 2 --budget-s 40 --tables $L/tables.txt > $L/bench 2>&1
grep -E "^decode|skipped" $L/bench | tail -20
echo "bench done $(( $(date +%s) - T0 )) s"
timeout 60 python3 benchmarks/sweep_decode.py --parts model --budget-s 20 2>&1 | grep -E "^step|sweep took"
for f in $L/t1 $L/t2 $L/t3 $L/t4 $L/variants; do echo "== $f"; tail -2 $f; done
echo "total $(( $(date +%s) - T0 )) s"
