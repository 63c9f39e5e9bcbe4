# Session 7, final decode call: GPU tests of the decode ops and generation (beside the compiles), then
# whole-step A/B of the new switches (sweep_decode model) + timelines of the new paths, then
# bench_generation vs mamba_ssm (same process). Run from the repo root on the H100 (carry .anchors).
python3 -m pip install -q --no-deps --no-index .anchors/*.whl; python3 -c "import mamba_ssm; print('mamba_ssm', mamba_ssm.__version__)"
export PYTHONPATH=. PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tc TRITON_CACHE_AUTOTUNING=1
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv,noheader
T0=$(date +%s)
(timeout 92 python3 -m pytest -q -p no:cacheprovider tests/ops/test_decode_linear.py tests/ops/test_greedy_argmax.py -k gpu > $OUT/tests_ops.log 2>&1; echo "ops tests rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/tests_ops.log) &
(timeout 92 python3 -m pytest -q -p no:cacheprovider tests/generation/test_decode.py -k cuda > $OUT/tests_gen.log 2>&1; echo "gen tests rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/tests_gen.log) &
timeout 80 python3 benchmarks/sweep_decode.py --parts model --compile-only --models mamba2-1.3b,mamba2-130m > /dev/null 2>&1 &
for m in mamba2-1.3b mamba2-130m mamba-130m; do timeout 80 python3 benchmarks/bench_generation.py --warmup --models $m > /dev/null 2>&1 & done
wait
echo "compile + tests phase $(( $(date +%s) - T0 )) s"; tail -2 $OUT/tests_ops.log $OUT/tests_gen.log
timeout 42 python3 benchmarks/sweep_decode.py --parts model,timeline --no-anchor --budget-s 30 2>&1 | grep -v "^timeline\|^step\|^case\|Warning\|_warn_once" | tee $OUT/sweep.log
echo "sweep done $(( $(date +%s) - T0 )) s"
timeout 76 python3 benchmarks/bench_generation.py --models mamba2-1.3b,mamba2-130m,mamba-130m,mamba-1.4b --no-transformers --no-fp32 --reps 2 --budget-s 58 2>&1 | grep -E "^\{|skipped|failed" | cut -c1-420
echo "bench done $(( $(date +%s) - T0 )) s"
