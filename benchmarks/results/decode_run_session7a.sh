# Session 7, call 1 (decode): kernel timelines of one graphed step (ours PDL on/off, mamba_ssm) at
# mamba2-1.3b b1 and mamba2-130m b64, whole-step A/B of launch settings at mamba2-1.3b b1, ncu of one
# eager mamba2-1.3b b1 step. Run from the repo root on the H100 (carry .anchors).
python3 -m pip install -q --no-deps --no-index .anchors/*.whl; python3 -c "import mamba_ssm; print('mamba_ssm', mamba_ssm.__version__)"
export PYTHONPATH=. PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tc TRITON_CACHE_AUTOTUNING=1
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv,noheader
timeout 60 python3 benchmarks/sweep_decode.py --parts model --compile-only --models mamba2-1.3b &
timeout 60 python3 benchmarks/bench_generation.py --warmup --models mamba2-130m --batches 64 > /dev/null 2>&1 &
wait
timeout 100 python3 benchmarks/sweep_decode.py --parts timeline,model --budget-s 80 2>&1 | tee $OUT/sweep.log
if command -v ncu > /dev/null; then
  timeout 50 ncu --profile-from-start off --section SpeedOfLight --section LaunchStats --section Occupancy \
    -k regex:'decode|ssm|row_norm' -c 8 python3 benchmarks/sweep_decode.py --parts ncu --models mamba2-1.3b > $OUT/ncu.txt 2>&1
  grep -E "^  [_a-z]|Duration|DRAM Throughput|Memory Throughput|Registers Per|Waves Per|Achieved Occ|Grid Size|Block Size" $OUT/ncu.txt | head -120
fi
