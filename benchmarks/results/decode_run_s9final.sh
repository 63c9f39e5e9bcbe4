#!/bin/bash
# decode session 9, FINAL call: GPU tests of the decode files + bench_generation (4 models, b1/b64, same process as mamba_ssm)
cd "$(dirname "$0")"
export PYTHONPATH=. PYTHONUNBUFFERED=1
L=$OUT/decode_final_log.txt
python3 -m pip install -q --no-deps --no-index ../../.anchors/*.whl > /dev/null 2>&1
python3 -c "import mamba_ssm; print('mamba_ssm', mamba_ssm.__version__)" 2>&1 | tail -1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader; git log -1 --oneline 2>/dev/null
T0=$(date +%s)
M="mamba2-1.3b mamba-1.4b mamba2-130m mamba-130m"
for m in $M; do timeout 50 python3 benchmarks/bench_generation.py --warmup --models $m --batches 1,64 > /tmp/warm_$m.log 2>&1 & done
timeout 50 python3 -m pytest -q tests/ops/test_decode_linear.py > /tmp/t1.log 2>&1 &
timeout 50 python3 -m pytest -q tests/ops/test_ssm_decode_step.py tests/ops/test_conv_xproj_step.py tests/ops/test_state_update.py tests/ops/test_greedy_argmax.py > /tmp/t2.log 2>&1 &
timeout 50 python3 -m pytest -q tests/generation/test_decode.py -k cuda > /tmp/t3.log 2>&1 &
wait
{ echo "== phase 1 $(( $(date +%s) - T0 )) s"; for f in /tmp/t1.log /tmp/t2.log /tmp/t3.log; do echo "== $f"; grep -E "^E |FAILED|passed|failed|error" $f | head -12; tail -c 300 $f; echo; done
  for m in $M; do echo "== warm $m: $(tail -1 /tmp/warm_$m.log)"; done; } > $L 2>&1
cat $L
timeout 72 python3 benchmarks/bench_generation.py --no-transformers --no-fp32 --reps 2 --batches 1,64 --budget-s 60 \
  --models mamba2-1.3b,mamba-1.4b,mamba2-130m,mamba-130m > /tmp/bench.log 2>&1
cat /tmp/bench.log >> $L
python3 - <<'PY'
import json, os
rows = json.load(open(os.path.join(os.environ["OUT"], "bench_generation.json")))
rows = rows.get("rows", rows) if isinstance(rows, dict) else rows
for r in rows:
    print(r["case"].split(" prompt")[0], r["provider"], r["ms"], r.get("graph_ms"), r.get("block_ms"), r.get("vs_mamba_ssm"))
PY
echo "total $(( $(date +%s) - T0 )) s"
