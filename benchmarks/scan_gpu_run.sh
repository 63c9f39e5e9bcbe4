#!/usr/bin/env bash
# scan helper's device call: host probe, repeated L=512/2048 timings against mamba_ssm, kernel
# profile, GPU tests of the scan and of the Mamba-1 compile path. Logs go straight to $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
R=${OUT:-/tmp/scan}; mkdir -p $R
pip install -q --no-deps --no-index .anchors/*.whl > /dev/null 2>&1
T0=$(date +%s)
stamp() { echo "exit $1 at $(( $(date +%s) - T0 )) s" >> $2; }
{ nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv; which ncu; nproc; lscpu | grep -i "model name"; } > $R/gpu.txt 2>&1
timeout 40 python3 benchmarks/host_selective_scan.py --cuda --profile > $R/host.log 2>&1; stamp $? $R/host.log
timeout 50 python3 - > $R/rep.log 2>&1 <<'PY'
from benchmarks.bench_selective_scan import bench_case
for rep in range(2):
    for L in (512, 2048):
        for p in ("fwd", "fwdbwd"):
            r = {prov: bench_case(prov, p, 4, 2048, L, 16) for prov in ("ours", "mamba_ssm")}
            print(rep, p, L, {k: round(v, 4) for k, v in r.items()}, "ratio", round(r["mamba_ssm"] / r["ours"], 3), flush=True)
PY
stamp $? $R/rep.log
timeout 30 python3 -c "import benchmarks.bench_selective_scan as b; b.profile()" > /dev/null 2>&1; stamp $? $R/bench_selective_scan_profile.txt
timeout 60 python3 -m pytest -q -rs -x tests/ops/test_selective_scan.py tests/ops/test_mamba_inner.py -k "cuda or opcheck or compiles" --durations=5 > $R/test_scan.log 2>&1; stamp $? $R/test_scan.log
timeout 60 python3 -m pytest -q -rs -x tests/models/test_compile.py -k "triton_path" --durations=5 > $R/test_compile.log 2>&1; stamp $? $R/test_compile.log
for f in gpu.txt host.log rep.log bench_selective_scan_profile.txt test_scan.log test_compile.log; do echo "== $f"; tail -n 22 $R/$f | cut -c1-200; done
