#!/usr/bin/env bash
# scan helper, device call 1: GPU tests, host probe, repeated L=512/2048 timings, profile.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
R=/tmp/scan1; mkdir -p $R
pip install -q --no-deps --no-index .anchors/*.whl > $R/pip.log 2>&1
T0=$(date +%s)
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv > $R/gpu.txt; which ncu >> $R/gpu.txt 2>&1
nproc >> $R/gpu.txt; lscpu | grep -i "model name" >> $R/gpu.txt
timeout 100 python3 -m pytest -q -rs -x tests/ops/test_selective_scan.py tests/ops/test_mamba_inner.py -k "cuda or opcheck or compiles" --durations=5 > $R/test_scan.log 2>&1; echo "exit $? at $(( $(date +%s) - T0 )) s" >> $R/test_scan.log
timeout 60 python3 benchmarks/host_selective_scan.py --cuda --profile > $R/host.log 2>&1; echo "exit $? at $(( $(date +%s) - T0 )) s" >> $R/host.log
timeout 70 python3 - > $R/rep.log 2>&1 <<'PY'
import torch, time
from benchmarks.bench_selective_scan import bench_case
for rep in range(3):
    for L in (512, 2048):
        for p in ("fwd", "fwdbwd"):
            r = {prov: bench_case(prov, p, 4, 2048, L, 16) for prov in ("ours", "mamba_ssm")}
            print(rep, p, L, {k: round(v, 4) for k, v in r.items()}, "ratio", round(r["mamba_ssm"] / r["ours"], 3), flush=True)
PY
echo "exit $? at $(( $(date +%s) - T0 )) s" >> $R/rep.log
OUT=$R timeout 40 python3 -c "import benchmarks.bench_selective_scan as b; b.profile()" > $R/prof.log 2>&1
echo "exit $? at $(( $(date +%s) - T0 )) s" >> $R/prof.log
timeout 100 python3 -m pytest -q -rs -x tests/models/test_compile.py --durations=5 > $R/test_compile.log 2>&1; echo "exit $? at $(( $(date +%s) - T0 )) s" >> $R/test_compile.log
tar -C $R -czf $OUT/scan1.tgz .
for f in gpu.txt test_scan.log host.log rep.log prof.log test_compile.log; do echo "== $f"; tail -n 25 $R/$f | cut -c1-220; done
