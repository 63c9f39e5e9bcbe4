#!/usr/bin/env bash
# scan helper's final device call (about 90 s): GPU tests of the scan, the Mamba-1 inner path and
# the Mamba-1 compile tests run in parallel processes with kernel warm-ups that fill Triton's disk
# cache; then, on a quiet machine, the full bench matrix against mamba_ssm (JSON + PNG to $OUT)
# and the host-time probe. Logs: $OUT/scan_logs.tgz, and their tails on stdout.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
L=/tmp/scan_logs; mkdir -p $L
T0=$(date +%s)
show() { echo "== $1 (exit $2 at $(( $(date +%s) - T0 )) s)"; grep -v DEBUG $L/$1.log | tail -n ${3:-4} | cut -c1-240; }
t() { name=$1; lim=$2; shift 2; (timeout $lim "$@" > $L/$name.log 2>&1; show $name $?) & }
warm() {  # compile the bench's kernels for state size $1 (the matrix rows' specialisation)
  echo "from benchmarks.bench_selective_scan import make_inputs, provider_fn
import torch
f = provider_fn('ours')
f(*make_inputs(4, 2048, 512, $1, requires_grad=True)).sum().backward()
with torch.no_grad():
    f(*make_inputs(4, 2048, 512, $1))
torch.cuda.synchronize()"
}
t tests_ref 80 python3 -m pytest -q -rs tests/ops/test_selective_scan.py -k "matches_ref_cuda"
t tests_other 80 python3 -m pytest -q -rs tests/ops/test_selective_scan.py -k "varlen_cuda or mamba_ssm_cuda or opcheck or compiles or fast_check"
t tests_inner 80 python3 -m pytest -q -rs tests/ops/test_mamba_inner.py -k "cuda or fast_check"
t tests_compile 80 python3 -m pytest -q -rs tests/models/test_compile.py -k "triton_path"
for n in 4 16 64; do t warm$n 60 python3 -c "$(warm $n)"; done
wait
timeout 60 python3 benchmarks/bench_selective_scan.py > $L/bench.log 2>&1; show bench $? 60
timeout 15 python3 benchmarks/host_selective_scan.py --cuda > $L/host.log 2>&1; show host $? 8
tar -C $L -czf ${OUT:-/tmp}/scan_logs.tgz .
