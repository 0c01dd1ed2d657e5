#!/usr/bin/env bash
# The GPU check of the vendor device path (docs/BENCHMARKS.md, "Device path").
#
# On a machine with an NVIDIA GPU and its driver (libcuda.so.1), in under five minutes:
#   1. builds the addon from source (node-gyp, all cores) and the TypeScript;
#   2. runs the device conformance suite (test/vendor/conformance.test.ts) on the real
#      GPU through the cuda device, next to the host device and the fakes;
#   3. prints device-to-device and cross-process IPC copy bandwidth through
#      epd-transfer next to the bare driver's cuMemcpyDtoD bandwidth, measured in the
#      same run (bench/device/dtod_peak.c, bench/device/cuda-bench.mjs).
#
# Needs: Node >= 20 with this checkout's node_modules (`npm ci` done, or carried to a
# machine without network: bench/device/prune-node-modules.mjs), gcc/g++, make and
# python3 for node-gyp, Node's headers (found next to the node binary, or
# NODE_DIR=/path/to/node-headers). No CUDA toolkit.
#
#   bench/device/run-cuda.sh [--device N] [--skip-build] [--json]
#     --device N     the GPU as nvidia-smi numbers it (default 0)
#     --skip-build   use build/Release and dist/ as they are (built elsewhere: N-API
#                    addons load on any Node >= 20 of the same platform)
#
# Exit status: 0 when the build, the suite and the benchmark all passed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
DEVICE=0
SKIP_BUILD=0
JSON=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --skip-build) SKIP_BUILD=1; shift ;;
    --json) JSON="--json"; shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "run-cuda.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done

START=$SECONDS
BUDGET=290  # seconds; each phase gets what is left, so the whole stays under five minutes
phase() { echo; echo "== [$((SECONDS - START))s] $*"; }
# Runs a command with the time budget that is left.
timed() {
  local left=$((BUDGET - (SECONDS - START)))
  if (( left < 10 )); then echo "run-cuda.sh: out of time budget before: $*" >&2; exit 124; fi
  timeout "$left" "$@"
}
need() { command -v "$1" >/dev/null 2>&1 || { echo "run-cuda.sh: '$1' is required ($2)" >&2; exit 1; }; }

need node "Node.js >= 20"
need gcc "to build the driver reference program"
BIN=node_modules/.bin
for tool in vitest $( (( SKIP_BUILD == 0 )) && echo tsc node-gyp); do
  [[ -x $BIN/$tool ]] || {
    echo "run-cuda.sh: node_modules lacks $tool: run 'npm ci' first (or carry node_modules here: see docs/BENCHMARKS.md)" >&2
    exit 1
  }
done

phase "machine"
echo "node $(node -v), $(nproc) CPUs, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv,noheader || true
else
  echo "(no nvidia-smi; what matters is the driver library, libcuda.so.1)"
fi

if (( SKIP_BUILD == 0 )); then
  phase "build the addon (node-gyp, all cores) and the TypeScript"
  GYP_ARGS=(rebuild -j max)
  # Node's own headers, so node-gyp needs no download (machines without network).
  NODE_PREFIX="$(dirname "$(dirname "$(command -v node)")")"
  if [[ -n "${NODE_DIR:-}" ]]; then
    GYP_ARGS+=(--nodedir "$NODE_DIR")
  elif [[ -f "$NODE_PREFIX/include/node/node_api.h" ]]; then
    GYP_ARGS+=(--nodedir "$NODE_PREFIX")
  fi
  LOG="$(mktemp)"
  timed "$BIN/node-gyp" "${GYP_ARGS[@]}" >"$LOG" 2>&1 || {
    tail -n 30 "$LOG" >&2
    echo "run-cuda.sh: the addon did not build (full log: $LOG)" >&2
    exit 1
  }
  timed "$BIN/tsc" -p .
fi
mkdir -p build
gcc -O2 -Wall -o build/dtod_peak bench/device/dtod_peak.c -ldl

phase "probe"
# Stops here, with the loader's reason, when this host's CUDA driver cannot be used.
node bin/epd-transfer.js probe --json | node -e '
  let s = ""; process.stdin.on("data", (d) => (s += d)).on("end", () => {
    const c = JSON.parse(s).devices.cuda;
    console.log("cuda:", JSON.stringify(c));
    if (!c.available) { console.error("run-cuda.sh: the cuda device is unavailable: " + c.reason); process.exit(1); }
  });'

phase "device conformance suite on the real GPU (and on host and the fakes)"
# The suite opens deviceId 0: make the chosen GPU the first visible one.
EPD_TEST_REAL_CUDA=1 CUDA_VISIBLE_DEVICES="$DEVICE" timed "$BIN/vitest" run test/vendor/conformance.test.ts --reporter=verbose

phase "bandwidth: epd-transfer next to cuMemcpyDtoD, same run"
CUDA_VISIBLE_DEVICES="$DEVICE" timed node bench/device/cuda-bench.mjs --peak build/dtod_peak --device 0 $JSON

phase "done in $((SECONDS - START))s"
