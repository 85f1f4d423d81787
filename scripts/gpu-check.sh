#!/usr/bin/env bash
# Everything GPU-specific, in one run, on a machine with an NVIDIA GPU.
# Prepare on a build machine with scripts/gpu-prepare.sh (fills gpu/), then
# run from the repository root there:  bash scripts/gpu-check.sh
# Results go to $RESULTS (default gpu-out: outside gpu/, so that a second
# call on the same machine, which brings gpu/ anew, keeps the first one's
# results and its table covers both); a short table is printed last and
# written to table.md there.
#
# PHASES (default "agree bench anchors") splits the work so that each device
# call stays under its time limit, e.g. PHASES=agree, then PHASES="bench",
# then PHASES=anchors; the table is printed after every call from whatever
# $OUT holds by then. PHASES=profile (not in the default) runs
# scripts/gpu-profile.sh: the kernels' device time per step. SKIP_JAX=1 and
# SKIP_TORCH=1 leave out an anchor; ANCHORS_APPEND=1 keeps anchors.jsonl, so
# that JAX can run first and PyTorch after the bench in one call.
#
# A dry run of the script itself on the fake GPU of the tests (no GPU; after
# the agreement tests have built it): BENCH_STEPS=2 shortens every timed
# trial, e.g.
#   LD_LIBRARY_PATH=$PWD/target/tmp/fake_gpu_sofo BENCH_STEPS=2 BENCH_ONLY=rnn-n128 \
#     GRAPH_TASKS= BASE_TASKS= LINEAR_TASKS= MEMORY_STEPS=2,4 RESULTS=/tmp/dry \
#     PHASES=bench bash scripts/gpu-check.sh
# (the baseline build, gpu/sofo-base, fails there: the fake GPU holds this
# build's kernels, and a kernel whose arguments changed since reads garbage)
set -u
PHASES=${PHASES:-agree bench anchors}
has() { [[ " $PHASES " == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
OUT=${RESULTS:-gpu-out}
mkdir -p "$OUT"
G=gpu
PY=${PY:-python3}

# the CUDA 13 libraries (cuBLAS, NVRTC) for the dynamically loaded backend
for lib in libcublas.so.13 libnvrtc.so.13; do
  d=$(dirname "$(find /usr/local/cuda*/ /usr/lib /opt "$($PY -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null)" \
        -name "$lib*" 2>/dev/null | head -n 1)" 2>/dev/null)
  [ -n "$d" ] && [ "$d" != "." ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
echo "built from: $(head -n 1 $G/BUILD 2>/dev/null || echo 'unknown (rerun scripts/gpu-prepare.sh)')" | tee "$OUT/build.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
$G/sofo devices 2>&1 | tee -a "$OUT/gpu.txt"

if has agree; then
echo "== backend agreement tests"
# every scratch buffer NaN-filled (a kernel that leaves an element unwritten
# shows); a missing GPU is an error, not a skip; the fake-GPU rerun is for
# machines without one
SOFO_GPU_POISON=1 SOFO_REQUIRE_GPU=1 SOFO_GPU_GRAPHS_TRACE=1 timeout 180 $G/cuda_agreement --test-threads 1 --nocapture \
  --skip agreement_tests_pass_on_the_fake_gpu 2>&1 | tee "$OUT/agreement.txt"
fi

if has bench; then
echo "== sofo bench --device cuda"
timeout 300 $G/sofo bench --device ${DEVICE:-cuda} ${BENCH_STEPS:+--steps $BENCH_STEPS} --json --iters 10 ${BENCH_ONLY:+--only $BENCH_ONLY} 2>&1 | tee "$OUT/sofo.jsonl"

echo "== sofo bench --device cuda, SOFO with CUDA graphs (SOFO_GPU_GRAPHS=1)"
SOFO_GPU_GRAPHS=1 timeout 150 $G/sofo bench --device ${DEVICE:-cuda} ${BENCH_STEPS:+--steps $BENCH_STEPS} --method sofo --json --iters 10 --only ${BENCH_ONLY:-rnn-} 2>&1 | tee "$OUT/sofo_graphs.jsonl"
# the arm and Kalman networks: ≈ 100 small launches per step, where graphs
# should matter most (their passes are capturable since slices run on the device)
for c in ${GRAPH_TASKS-reach2 kalman-long}; do
  SOFO_GPU_GRAPHS=1 timeout 120 $G/sofo bench --device ${DEVICE:-cuda} ${BENCH_STEPS:+--steps $BENCH_STEPS} --method sofo --json --iters 5 --only $c 2>&1 | tee -a "$OUT/sofo_graphs.jsonl"
done

echo "== the dense linear terms (r·W, ṙ·W + r·Ẇ) through linear_init and cuBLAS (SOFO_GPU_LINEAR=gemm)"
# the default (auto) fuses up to 128 inner columns where the output fills the
# kernel's 64-wide tiles (under TF32 on the tensor cores, as cuBLAS's GEMMs
# then are): gemm says whether the fused kernel wins where auto uses it,
# fused whether it also wins where auto does not (N = 100, N = 400); the same
# two under TF32 below; LINEAR_CHOICES=gemm skips the second
for choice in ${LINEAR_CHOICES:-gemm fused}; do
  SOFO_GPU_LINEAR=$choice timeout 150 $G/sofo bench --device ${DEVICE:-cuda} ${BENCH_STEPS:+--steps $BENCH_STEPS} --method sofo --json --iters 10 --only ${BENCH_ONLY:-rnn-} 2>&1 | tee "$OUT/sofo_linear_$choice.jsonl"
done
# the task networks: reach2 (its rates read from z), kalman-long (relu and
# the leak applied by linear_dense, Ops::unary_of_linear)
for c in ${LINEAR_TASKS-reach2 kalman-long}; do
  SOFO_GPU_LINEAR=gemm timeout 120 $G/sofo bench --device ${DEVICE:-cuda} ${BENCH_STEPS:+--steps $BENCH_STEPS} --method sofo --json --iters 5 --only $c 2>&1 | tee -a "$OUT/sofo_linear_gemm.jsonl"
done

# (its inputs are uploaded before the clock starts since 2026-11-27: before,
# the upload of N = 400's tangents made the pass slower than an iteration)
echo "== sofo bench --device cuda --method pass (the forward-K pass and its sketch alone: the rest of an iteration is the difference)"
timeout 120 $G/sofo bench --device ${DEVICE:-cuda} ${BENCH_STEPS:+--steps $BENCH_STEPS} --method pass --json --iters 10 --only ${BENCH_ONLY:-rnn-} 2>&1 | tee "$OUT/sofo_pass.jsonl"

if [ -x $G/sofo-base ]; then
echo "== the same SOFO bench with the baseline build $(cat $G/BASE 2>/dev/null) (scripts/gpu-prepare.sh BASE=...)"
timeout 150 $G/sofo-base bench --device ${DEVICE:-cuda} ${BENCH_STEPS:+--steps $BENCH_STEPS} --method sofo --json --iters 10 --only ${BENCH_ONLY:-rnn-} 2>&1 | tee "$OUT/sofo_base.jsonl"
# the arm's step as one kernel (reach2) against the baseline's ≈ 45 launches
for c in ${BASE_TASKS-reach2}; do
  timeout 120 $G/sofo-base bench --device ${DEVICE:-cuda} ${BENCH_STEPS:+--steps $BENCH_STEPS} --method sofo --json --iters 5 --only $c 2>&1 | tee -a "$OUT/sofo_base.jsonl"
done
fi

echo "== sofo bench --device cuda --gpu-matmul tf32 (SOFO; TF32 tensor cores as JAX's default, linear_dense_tf32 where auto fuses)"
timeout 150 $G/sofo bench --device ${DEVICE:-cuda} ${BENCH_STEPS:+--steps $BENCH_STEPS} --gpu-matmul tf32 --method sofo --json --iters 10 --only ${BENCH_ONLY:-rnn-} 2>&1 | tee "$OUT/sofo_tf32.jsonl"
# the fused TF32 kernel against cuBLAS's TF32 GEMMs, and fused at N = 400 too
for choice in ${LINEAR_CHOICES:-gemm fused}; do
  SOFO_GPU_LINEAR=$choice timeout 150 $G/sofo bench --device ${DEVICE:-cuda} ${BENCH_STEPS:+--steps $BENCH_STEPS} --gpu-matmul tf32 --method sofo --json --iters 10 --only ${BENCH_ONLY:-rnn-} 2>&1 | tee "$OUT/sofo_tf32_linear_$choice.jsonl"
done

echo "== memory against T (rate RNN N=128 M=64 K=64)"
timeout 120 $G/sofo bench --device ${DEVICE:-cuda} --json --iters 2 --only rnn-n128 --steps ${MEMORY_STEPS:-32,256,1024,4096,16384} 2>&1 | tee "$OUT/sofo_memory.jsonl"

fi

if has profile; then
echo "== per-kernel device time of a few steps (Nsight Compute)"
# with the hot kernels in detail (DETAIL= leaves that out)
RESULTS="$OUT" DETAIL="${DETAIL-linear_dense linear_narrow linear_init}" bash scripts/gpu-profile.sh
# and the TF32 kernel (linear_dense_tf32), forced: at rnn-kalman (N = 100)
# auto gives the term to cuBLAS
RESULTS="$OUT" MATMUL=tf32 LINEARS=fused bash scripts/gpu-profile.sh
fi

if has anchors; then
echo "== anchors: JAX SOFO and PyTorch Adam-BPTT on the same configurations"
$PY -c 'import jax; print("jax", jax.__version__, jax.devices())' 2>&1 | tail -n 1
[ -z "${ANCHORS_APPEND:-}" ] && : > "$OUT/anchors.jsonl"
# N B K T iterations
CONFIGS=${CONFIGS:-"128,64,64,50,10 400,128,128,32,10 64,256,128,1000,5 100,256,128,5000,3"}
[ -n "${SKIP_ANCHORS:-}" ] && CONFIGS=""
for cfg in $CONFIGS; do
  cfg=${cfg//,/ }
  set -- $cfg
  [ -z "${SKIP_JAX:-}" ] && timeout 120 $PY $G/anchors/sofo_jax.py bench --method sofo --N $1 --B $2 --K $3 --T $4 --iters $5 --warmup 1 2>/dev/null \
    | sed -n 's/^RESULT //p' >> "$OUT/anchors.jsonl"
  # JAX again with full-f32 matmuls (its default on this hardware is TF32)
  [ -z "${SKIP_JAX:-}" ] && JAX_DEFAULT_MATMUL_PRECISION=highest timeout 120 $PY $G/anchors/sofo_jax.py bench --method sofo --N $1 --B $2 --K $3 --T $4 --iters $5 --warmup 1 2>/dev/null \
    | sed -n 's/^RESULT {/{"precision": "highest", /p' >> "$OUT/anchors.jsonl"
  [ -z "${SKIP_TORCH:-}" ] && timeout 120 $PY $G/anchor_torch_gpu.py $G/anchors bench --method adam --N $1 --B $2 --T $4 --iters $5 --warmup 1 2>/dev/null \
    | sed -n 's/^RESULT //p' >> "$OUT/anchors.jsonl"
done

fi

echo "== table (seconds per iteration; the GPU above)"
$PY - "$OUT" <<'PY' | tee "$OUT/table.md"
import json, sys, os
out = sys.argv[1]
def lines(name):
    # the JSON lines of a result file (stderr lines and missing files skipped)
    try:
        f = open(os.path.join(out, name))
    except OSError:
        return []
    rows = []
    for l in f:
        try:
            rows.append(json.loads(l))
        except Exception:
            pass
    return rows
sofo = lines("sofo.jsonl")
anch = {}
for r in lines("anchors.jsonl"):
    try:
        fw = r["framework"] + ("-f32" if r.get("precision") == "highest" else "")
        anch[(fw, r["method"], r["N"], r["B"], r["T"])] = r
    except Exception:
        pass
tf32 = {(r["name"], r["n"], r["m"], r["t"]): r["seconds_per_iter"] for r in lines("sofo_tf32.jsonl") if "name" in r}
graphs = {(r["name"], r["n"], r["m"], r["t"]): r["seconds_per_iter"] for r in lines("sofo_graphs.jsonl") if "name" in r}
passes = {(r["name"], r["n"], r["m"], r["t"]): r["seconds_per_iter"] for r in lines("sofo_pass.jsonl") if "name" in r}
base = {(r["name"], r["n"], r["m"], r["t"]): r["seconds_per_iter"] for r in lines("sofo_base.jsonl") if "name" in r}
lin_gemm = {(r["name"], r["n"], r["m"], r["t"]): r["seconds_per_iter"] for r in lines("sofo_linear_gemm.jsonl") if "name" in r}
lin_fused = {(r["name"], r["n"], r["m"], r["t"]): r["seconds_per_iter"] for r in lines("sofo_linear_fused.jsonl") if "name" in r}
tf32_gemm = {(r["name"], r["n"], r["m"], r["t"]): r["seconds_per_iter"] for r in lines("sofo_tf32_linear_gemm.jsonl") if "name" in r}
tf32_fused = {(r["name"], r["n"], r["m"], r["t"]): r["seconds_per_iter"] for r in lines("sofo_tf32_linear_fused.jsonl") if "name" in r}
print("| config | sofo SOFO | its pass alone | baseline build | dense terms on cuBLAS | dense terms always fused | sofo SOFO, graphs | sofo SOFO TF32 | TF32, dense terms on cuBLAS | TF32, always fused | sofo Adam-BPTT | JAX SOFO (default, TF32) | JAX SOFO (f32) | torch Adam-BPTT | SOFO / torch Adam | SOFO TF32 / JAX | SOFO / JAX f32 | fastest sofo SOFO / JAX |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
own_adam = {(r["name"], r["n"], r["m"], r["t"]): r["seconds_per_iter"] for r in sofo if r.get("method") == "adam"}
for r in sofo:
    if r.get("method") == "adam":
        continue
    n, m, t, s = r["n"], r["m"], r["t"], r["seconds_per_iter"]
    key = (r["name"], n, m, t)
    rnn = r["name"].startswith("rnn")
    j = anch.get(("jax", "sofo", n, m, t), {}).get("median_s") if rnn else None
    a = anch.get(("torch", "adam", n, m, t), {}).get("median_s") if rnn else None
    j32 = anch.get(("jax-f32", "sofo", n, m, t), {}).get("median_s") if rnn else None
    oa, st, gr = own_adam.get(key), tf32.get(key), graphs.get(key)
    f = lambda v: f"{v:.4g}" if v else "—"
    q = lambda x, y: f"{x / y:.2f}" if x and y else "—"
    # the fastest of sofo's ways (default, cuBLAS or fused dense terms,
    # graphs, TF32 with either) against JAX's default, and which way it was
    ways = {"default": s, "gemm": lin_gemm.get(key), "fused": lin_fused.get(key), "graphs": gr, "tf32": st,
            "tf32 gemm": tf32_gemm.get(key), "tf32 fused": tf32_fused.get(key)}
    way, best = min(((w, v) for w, v in ways.items() if v), key=lambda wv: wv[1])
    fastest = f"{q(best, j)} ({way})" if j else "—"
    print(f"| {r['name']} N={n} M={m} K={r['k']} T={t} | {f(s)} | {f(passes.get(key))} | {f(base.get(key))} | {f(lin_gemm.get(key))} | {f(lin_fused.get(key))} | {f(gr)} | {f(st)} | {f(tf32_gemm.get(key))} | {f(tf32_fused.get(key))} | {f(oa)} | {f(j)} | {f(j32)} | {f(a)} | {q(s, a)} | {q(st, j)} | {q(s, j32)} | {fastest} |")
print()
# where a SOFO iteration's time goes (three more iterations, each phase
# ended by a device synchronisation: sofo::cuda::SofoPhases)
print("| config (default way) | draw and normalise the directions ms | pass and sketch ms | step ms | sum / s per iter |")
print("|---|---|---|---|---|")
for r in sofo:
    ph = r.get("phases")
    if r.get("method") != "sofo" or not ph:
        continue
    tot = ph["draw_s"] + ph["pass_s"] + ph["step_s"]
    print(f"| {r['name']} N={r['n']} M={r['m']} K={r['k']} T={r['t']} | {ph['draw_s'] * 1e3:.3g} | {ph['pass_s'] * 1e3:.3g} | {ph['step_s'] * 1e3:.3g} | {tot / r['seconds_per_iter']:.2f} |")
print()
print("| method | T | sofo peak device MiB | s/iter |")
print("|---|---|---|---|")
for r in lines("sofo_memory.jsonl"):
    b = r.get("peak_device_bytes")
    mb = f"{b / 2**20:.2f}" if b is not None else "—"
    print(f"| {r.get('method', 'sofo')} | {r.get('t')} | {mb} | {r.get('seconds_per_iter', 0):.4g} |")
PY
