#!/usr/bin/env bash
# Where a SOFO step's device time goes: Nsight Compute times every kernel of
# a few time steps (one metric, so one replay per kernel: seconds, not
# minutes) of the forward-K pass at a bench configuration, and prints the
# kernels by total time per step. Run on the GPU machine after
# scripts/gpu-prepare.sh, from the repository root:
#   bash scripts/gpu-profile.sh            (CONFIG=rnn-kalman STEPS=24 by default)
# Output under $RESULTS (default gpu-out): ncu_<choice>.csv and profile_<choice>.md;
# with DETAIL="kernel ...", each kernel's detailed report (end of this file).
#   DETAIL="linear_dense linear_narrow linear_init" LINEARS= bash scripts/gpu-profile.sh
set -u
cd "$(dirname "$0")/.."
OUT=${RESULTS:-gpu-out}
mkdir -p "$OUT"
CONFIG=${CONFIG:-rnn-kalman}
STEPS=${STEPS:-24}
for lib in libcublas.so.13 libnvrtc.so.13; do
  d=$(dirname "$(find /usr/local/cuda*/ /usr/lib /opt -name "$lib*" 2>/dev/null | head -n 1)" 2>/dev/null)
  [ -n "$d" ] && [ "$d" != "." ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)
echo "ncu: $NCU"
# the pass alone (no warm-up iterations beyond bench's own), STEPS steps;
# skip the set-up launches (tangent draw, parameter gathers) and the first
# steps, then time COUNT launches (a step is 3 kernels with the hidden layer
# in linear_dense; 4 kernels and 3 GEMMs with SOFO_GPU_LINEAR=gemm), once per
# choice in LINEARS (default: fused, then gemm — which of the two is faster;
# at rnn-kalman, N = 100, auto is gemm since 2026-11-27; LINEARS= none),
# in MATMUL (f32 by default; tf32: linear_dense_tf32 and cuBLAS's TF32 GEMMs)
MATMUL=${MATMUL:-f32}
for choice in ${LINEARS-fused gemm}; do
echo "== SOFO_GPU_LINEAR=$choice --gpu-matmul $MATMUL"
[ "$MATMUL" = f32 ] || choice="$choice-$MATMUL"
SOFO_GPU_LINEAR=${choice%-*} timeout 240 "$NCU" --metrics gpu__time_duration.sum --csv --print-units base \
  --launch-skip ${SKIP:-60} --launch-count ${COUNT:-70} \
  gpu/sofo bench --device cuda --method pass --only "$CONFIG" --steps "$STEPS" --iters 1 --gpu-matmul "$MATMUL" \
  > "$OUT/ncu_$choice.csv" 2> "$OUT/ncu_$choice.err"
echo "ncu exit $?"
tail -n 5 "$OUT/ncu_$choice.err"
python3 - "$OUT/ncu_$choice.csv" <<'PY' | tee "$OUT/profile_$choice.md"
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 5]
if not rows:
    print("no kernel rows (see the .err file)"); sys.exit()
head = rows[0]
k, m, v = head.index("Kernel Name"), head.index("Metric Name"), head.index("Metric Value")
tot, n = collections.Counter(), collections.Counter()
for r in rows[1:]:
    if r[m] == "gpu__time_duration.sum":
        name = r[k][:70]
        tot[name] += float(r[v].replace(",", ""))
        n[name] += 1
# the hidden layer runs once per step of the rate RNN (linear_dense, or,
# with its dense term on cuBLAS, φ with φ′⊙ẋ first): the steps covered
steps = max([v for x, v in n.items() if x.startswith(("linear_dense", "unary_tangent"))] + [1])
print(f"| kernel | launches | mean µs | µs per step ({steps} steps) |")
print("|---|---|---|---|")
for name, t in tot.most_common():
    print(f"| {name} | {n[name]} | {t / n[name] / 1e3:.2f} | {t / steps / 1e3:.2f} |")
print(f"| all | {sum(n.values())} | | {sum(tot.values()) / steps / 1e3:.2f} |")
PY
done

# DETAIL="linear_dense linear_narrow ..." (default none): one launch of each
# of those kernels in detail (occupancy, issue rate, instruction counts,
# stall reasons, memory traffic, and the SASS lines warps stall at), caches
# not flushed as in a pass; SOFO_GPU_LINEAR as in LINEAR_DETAIL (default
# fused, so that linear_dense runs, and gemm for linear_init, which runs
# where the dense terms go to cuBLAS). Output: ncu_detail_<kernel>.txt, the
# headline metrics printed.
for kernel in ${DETAIL:-}; do
  echo "== $kernel in detail"
  choice=fused
  [ "$kernel" = linear_init ] && choice=gemm
  SOFO_GPU_LINEAR=${LINEAR_DETAIL:-$choice} timeout 60 "$NCU" --cache-control none \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SchedulerStats --section InstructionStats --section MemoryWorkloadAnalysis \
    --section SourceCounters -k "regex:^$kernel\$" -s 4 -c 1 \
    gpu/sofo bench --device cuda --method pass --only "$CONFIG" --steps 8 --iters 1 --gpu-matmul "$MATMUL" \
    > "$OUT/ncu_detail_$kernel.txt" 2>&1
  echo "ncu exit $?"
  grep -E "^\s+(Duration|Registers Per Thread|Achieved Active Warps Per SM|Issued Warp Per Scheduler|Executed Instructions|Warp Cycles Per Issued Instruction|Compute \(SM\) Throughput|Memory Throughput)\s" \
    "$OUT/ncu_detail_$kernel.txt"
done
