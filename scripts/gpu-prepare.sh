#!/usr/bin/env bash
# Builds, on this machine, everything scripts/gpu-check.sh needs on the GPU
# machine (which has no Rust toolchain and no registry): the release binary
# and the backend-agreement test binary with the cuda feature, and a copy of
# the Python anchors, all under gpu/ (git-ignored).
#
# BASE=<git revision> also builds the release binary of that revision as
# gpu/sofo-base (in a temporary worktree, own target directory), so that
# gpu-check.sh times the two builds side by side on the same card:
#   BASE=2276fe5 bash scripts/gpu-prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ANCHORS=${ANCHORS:-../shared/anchors}
rm -rf gpu && mkdir -p gpu/anchors
cargo build --release --features cuda --quiet
cp target/release/sofo gpu/sofo
test_bin=$(cargo test --release -p sofo --features cuda --test cuda_agreement --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda_agreement":
        print(m["executable"])')
cp "$test_bin" gpu/cuda_agreement
cp "$ANCHORS"/*.py gpu/anchors/
cp scripts/anchor_torch_gpu.py gpu/
if [ -n "${BASE:-}" ]; then
  wt=$(mktemp -d)
  git worktree add --detach "$wt" "$BASE" >/dev/null
  (cd "$wt" && CARGO_TARGET_DIR="$PWD/../sofo-base-target" cargo build --release --features cuda --quiet)
  cp "$(dirname "$wt")/sofo-base-target/release/sofo" gpu/sofo-base
  git worktree remove --force "$wt"
  strip --strip-debug gpu/sofo-base
  git rev-parse "$BASE" > gpu/BASE
fi
# no debug info: what travels to the GPU machine is size-limited
strip --strip-debug gpu/sofo gpu/cuda_agreement
# what was built, so that a GPU run names the commit it tested
{ git rev-parse HEAD; git status --short | sed -n 1,20p; } > gpu/BUILD
du -sh gpu
