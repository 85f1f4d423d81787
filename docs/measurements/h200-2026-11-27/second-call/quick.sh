#!/usr/bin/env bash
# The second H200 call of 2026-11-27: the build after linear_narrow's
# staging and auto's tile-fill rule, against 9edf8e4 (gpu/sofo-base) and JAX
# on the same card, then where a step's device time goes. Results under
# $RESULTS; each step's timeout keeps the call inside the session's budget.
set -u
cd "$(dirname "$0")/.."
R=${RESULTS:?}
mkdir -p "$R"
G=gpu
for lib in libcublas.so.13 libnvrtc.so.13; do
  d=$(dirname "$(find /usr/local/cuda*/ /usr/lib /opt -name "$lib*" 2>/dev/null | head -n 1)" 2>/dev/null)
  [ -n "$d" ] && [ "$d" != "." ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
head -n 1 $G/BUILD | tee "$R/build.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$R/gpu.txt"
echo "== agreement"
SOFO_GPU_POISON=1 SOFO_REQUIRE_GPU=1 timeout 40 $G/cuda_agreement --test-threads 1 --nocapture \
  --skip agreement_tests_pass_on_the_fake_gpu > "$R/agreement.txt" 2>&1
grep -E "test result|FAILED|panicked" "$R/agreement.txt"
echo "== bench, this build, SOFO"
timeout 40 $G/sofo bench --device cuda --method sofo --json --iters 3 > "$R/sofo.jsonl" 2>&1
echo "== bench, 9edf8e4, rate RNNs"
timeout 20 $G/sofo-base bench --device cuda --method sofo --json --iters 3 --only rnn- > "$R/sofo_base.jsonl" 2>&1
echo "== JAX"
: > "$R/anchors.jsonl"
for cfg in "64 256 128 1000 3" "100 256 128 5000 2"; do
  set -- $cfg
  timeout 15 python3 $G/anchors/sofo_jax.py bench --method sofo --N $1 --B $2 --K $3 --T $4 --iters $5 --warmup 1 2>/dev/null \
    | sed -n 's/^RESULT //p' >> "$R/anchors.jsonl"
  JAX_DEFAULT_MATMUL_PRECISION=highest timeout 15 python3 $G/anchors/sofo_jax.py bench --method sofo --N $1 --B $2 --K $3 --T $4 --iters $5 --warmup 1 2>/dev/null \
    | sed -n 's/^RESULT {/{"precision": "highest", /p' >> "$R/anchors.jsonl"
done
echo "== fused at N = 100; TF32"
SOFO_GPU_LINEAR=fused timeout 15 $G/sofo bench --device cuda --method sofo --json --iters 3 --only rnn-kalman > "$R/sofo_linear_fused.jsonl" 2>&1
timeout 20 $G/sofo bench --device cuda --gpu-matmul tf32 --method sofo --json --iters 3 --only rnn- > "$R/sofo_tf32.jsonl" 2>&1
echo "== per-kernel device time"
RESULTS="$R" LINEARS="auto fused" STEPS=16 timeout 25 bash scripts/gpu-profile.sh
echo "== linear_dense in detail"
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)
SOFO_GPU_LINEAR=fused timeout 25 "$NCU" --cache-control none --section SpeedOfLight --section Occupancy --section LaunchStats \
  --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
  -k regex:linear_dense -s 4 -c 1 $G/sofo bench --device cuda --method pass --only rnn-kalman --steps 8 --iters 1 \
  > "$R/ncu_linear_dense.txt" 2>&1
tail -n 60 "$R/ncu_linear_dense.txt"
echo "== linear_init in detail (auto: cuBLAS at N = 100)"
timeout 25 "$NCU" --cache-control none --section SpeedOfLight --section Occupancy --section LaunchStats \
  --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
  -k regex:linear_init -s 4 -c 1 $G/sofo bench --device cuda --method pass --only rnn-kalman --steps 8 --iters 1 \
  > "$R/ncu_linear_init.txt" 2>&1
tail -n 40 "$R/ncu_linear_init.txt"
