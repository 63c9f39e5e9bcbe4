# dprod session 11: GPU tests of decode_linear, gemm sweep (64 rows, cold weights) and whole-step b64 A/B of the
# prefetch / TMA settings (sweep_decode), then (GEN=1) bench_generation at b64 for the 1.3b / 1.4b models.
# Run from build/iso_dprod: AB=MODEL_AB_DPROD GO="..." bash dprod_run_s11.sh
#   call a (23:31): AB=MODEL_AB_DPROD  GO="pick,pick prefetch,pick prefetch512,pick tma,pick tma+prefetch,k256 tma,k256 tma+prefetch,n32 k256,prefetch s3"
#   call b (23:42): AB=MODEL_AB_DPROD2 GO="pick,pick prefetch512,pfline512,pfline256,pfline all,pick tma,tma+pfline512"
#   call c:         AB=MODEL_AB_DPROD3 GO="pick,pick off,pfline256,pfline512,n32" GEN=1
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. TRITON_CACHE_DIR=/tmp/tc
python3 -m pip install -q --no-deps --no-index ../../.anchors/*.whl 2>&1 | tail -1
nvidia-smi --query-gpu=name --format=csv,noheader
MODELS=mamba2-1.3b,mamba-1.4b,mamba2-130m,mamba-130m
t0=$(date +%s)
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/ops/test_decode_linear.py > $OUT/tests.log 2>&1 &
if [ "${GEN:-0}" = 1 ]; then  # the model's b12 decode step through the tl.dot kernel as accurate as cuBLAS's
  timeout 170 python3 -m pytest -q -p no:cacheprovider tests/generation/test_decode.py -k dot_step_equals > $OUT/tests_gen.log 2>&1 &
fi
for i in 0 1 2 3 4; do
  timeout 120 python3 benchmarks/sweep_decode.py --parts gemm --gemm-shapes $i --gemm-only "$GO" --compile-only > /tmp/cg$i.log 2>&1 &
done
for m in ${MODELS//,/ }; do
  timeout 120 python3 benchmarks/sweep_decode.py --parts model --model-ab $AB --models $m --compile-only > /tmp/cm_$m.log 2>&1 &
done
if [ "${GEN:-0}" = 1 ]; then
  for m in mamba2-1.3b mamba-1.4b; do
    timeout 150 python3 benchmarks/bench_generation.py --warmup --models $m --batches 64 --no-transformers --no-fp32 > /tmp/warm_$m.log 2>&1 &
  done
fi
wait
echo "== phase 1 $(( $(date +%s) - t0 )) s"; tail -3 /tmp/cg*.log /tmp/cm_*.log | grep -v "^$" | tail -30
python3 benchmarks/sweep_decode.py --parts gemm,model --gemm-shapes 0,1,2,3,4 --gemm-only "$GO" --model-ab $AB \
  --models $MODELS --budget-s ${BUDGET:-230} 2>&1 | grep -v "^\s*$" | tee $OUT/sweep.log
if [ "${GEN:-0}" = 1 ]; then
  python3 benchmarks/bench_generation.py --models mamba2-1.3b,mamba-1.4b --batches 64 --no-transformers --no-fp32 --reps 2 \
    2>&1 | tee $OUT/gen.log | grep -v "^\s*$" | tail -20
fi
echo "== total $(( $(date +%s) - t0 )) s"; for f in $OUT/tests*.log; do tail -n 3 "$f"; done
