#!/usr/bin/env bash
# Times SOFO iterations of the JAX anchor and of sofo side by side, on the same
# machine in the same minute (a shared machine's speed drifts).
#   scripts/bench-vs-anchor.sh [PYTHON]   PYTHON has jax, jaxlib, optax, numpy
#                                          (../shared/anchors/requirements.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
ANCHORS=${ANCHORS:-../shared/anchors}
cargo build --release --quiet
echo "# $(date -u +%FT%TZ) $(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg)"
for cfg in "128 64 64 50 rnn-n128" "400 128 128 32 rnn-n400"; do
  set -- $cfg
  for method in sofo adam; do
    "$PY" "$ANCHORS/sofo_jax.py" bench --method $method --N "$1" --B "$2" --K "$3" --T "$4" --iters 10 2>/dev/null \
      | sed -n 's/^RESULT //p' \
      | "$PY" -c 'import json,sys; r=json.load(sys.stdin); print(json.dumps({"method": r["method"], "name": "jax-anchor", "n": r["N"], "m": r["B"], "k": r["K"], "t": r["T"], "seconds_per_iter": r["median_s"], "xla_temp_mib": r.get("xla_temp_mib")}))'
    target/release/sofo bench --json --only "$5" --method $method
  done
done
target/release/sofo bench --json --only lorenz --method sofo
# memory against T: sofo's accounting, then JAX's XLA temp for the same T
target/release/sofo bench --json --memory --steps 32,256,1024,4096,16384
for T in 32 256 1024 4096; do
  for method in sofo adam; do
    "$PY" "$ANCHORS/sofo_jax.py" bench --method $method --N 128 --B 64 --K 64 --T $T --iters 1 --warmup 1 2>/dev/null \
      | sed -n 's/^RESULT //p' \
      | "$PY" -c 'import json,sys; r=json.load(sys.stdin); print(json.dumps({"name": "jax-anchor-memory", "method": r["method"], "t": r["T"], "xla_temp_mib": r.get("xla_temp_mib")}))'
  done
done
