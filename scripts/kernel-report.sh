#!/usr/bin/env bash
# What the GPU compiler makes of each kernel, without a GPU: the kernel
# source of sofo_tensor::cuda compiled by NVRTC to PTX, assembled by ptxas for
# an H100/H200 (sm_90), and per kernel its registers, stack frame, spills,
# local-memory loads/stores and SASS instruction count. A hot kernel with a
# stack frame or local loads keeps an array in local memory (slow): index
# arrays with compile-time bounds. Fetches NVRTC, ptxas, cuobjdump and
# nvdisasm from PyPI into .whl/ (git-ignored) the first time.
#   bash scripts/kernel-report.sh            (ARCH=sm_90 by default)
# NO_LOCAL="kernel kernel ..." fails the run if one of those kernels has a
# stack frame, spills or local loads/stores (.ci/run: the hot ones).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-nvrtc.sh
W=.whl
fetch() { # package version: unpacked into .whl/<package>
  [ -d "$W/$1" ] && return
  python3 -m pip download --quiet --no-deps "$1==$2" -d "$W"
  python3 -m zipfile -e "$W/${1//-/_}-$2-"*.whl "$W/$1"
  chmod +x "$W/$1"/nvidia/cu13/bin/* 2>/dev/null || true
}
fetch nvidia-cuda-nvcc 13.0.88
fetch nvidia-cuda-cuobjdump 13.2.51
fetch nvidia-cuda-nvdisasm 13.2.51
export LD_LIBRARY_PATH="$PWD/$W/nvrtc/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
export PATH="$PWD/$W/nvidia-cuda-nvdisasm/nvidia/cu13/bin:$PATH"
ARCH=${ARCH:-sm_90}
tmp=$(mktemp -d)
python3 - crates/sofo-tensor/src/cuda.rs "$tmp/k.ptx" "compute_${ARCH#sm_}" <<'PY'
import ctypes, re, sys
src = re.search(r'const KERNELS: &str = r#"(.*?)"#;', open(sys.argv[1]).read(), re.S).group(1).encode()
lib = ctypes.CDLL("libnvrtc.so.13")
prog = ctypes.c_void_p()
assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"kernels.cu", 0, None, None) == 0
opts = (ctypes.c_char_p * 1)(f"--gpu-architecture={sys.argv[3]}".encode())
ok = lib.nvrtcCompileProgram(prog, 1, opts) == 0
n = ctypes.c_size_t()
lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
log = ctypes.create_string_buffer(n.value)
lib.nvrtcGetProgramLog(prog, log)
if not ok:
    sys.exit(log.value.decode())
lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
ptx = ctypes.create_string_buffer(n.value)
lib.nvrtcGetPTX(prog, ptx)
open(sys.argv[2], "w").write(ptx.value.decode())
PY
"$W/nvidia-cuda-nvcc/nvidia/cu13/bin/ptxas" -arch="$ARCH" -v "$tmp/k.ptx" -o "$tmp/k.cubin" 2> "$tmp/ptxas.txt"
echo "| kernel ($ARCH) | registers | stack bytes | spill bytes | local ld/st | SASS instructions |"
echo "|---|---|---|---|---|---|"
awk '/Compiling entry function/ { match($0, /'"'"'[a-z_0-9]+'"'"'/); k = substr($0, RSTART + 1, RLENGTH - 2) }
     /bytes stack frame/ { stack[k] = $1; spill[k] = $5 + $9 }
     /Used [0-9]+ registers/ { match($0, /Used [0-9]+/); regs[k] = substr($0, RSTART + 5, RLENGTH - 5) }
     END { for (k in regs) print k, regs[k], stack[k], spill[k] }' "$tmp/ptxas.txt" | sort |
while read -r k regs stack spill; do
  sass=$("$W/nvidia-cuda-cuobjdump/nvidia/cu13/bin/cuobjdump" -sass -fun "$k" "$tmp/k.cubin")
  echo "| $k | $regs | $stack | $spill | $(grep -cE 'LDL|STL' <<< "$sass") | $(grep -cE '/\*[0-9a-f]{4,}\*/' <<< "$sass") |"
done | tee "$tmp/table.md"
bad=0
for k in ${NO_LOCAL:-}; do
  row=$(grep -E "^\| $k \|" "$tmp/table.md") || { echo "kernel-report: no kernel $k" >&2; bad=1; continue; }
  read -r stack spill local <<< "$(awk -F'|' '{ print $4, $5, $6 }' <<< "$row")"
  if [ "$stack$spill$local" != "000" ]; then
    echo "kernel-report: $k has local memory (stack $stack bytes, spills $spill bytes, $local local loads/stores)" >&2
    bad=1
  fi
done
rm -rf "$tmp"
exit $bad
