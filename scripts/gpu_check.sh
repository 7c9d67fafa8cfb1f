#!/usr/bin/env bash
# One-shot GPU check: bash scripts/gpu_check.sh [gpu_check.py flags]
# Times, on one CUDA GPU and in at most 10 minutes, what the CPU cannot: hw2_1.sh end to end, P1 training
# throughput (bf16), the P2 50-step batch of ten at 256 px end to end, the SD1.4-sized P3 ControlNet step
# (fp32 vs bf16 + checkpointing: it/s, memory), the SD1.4-sized P5 textual-inversion step and 25-image
# generation, and i-CLEVR sampling; writes them, with the device name, into BENCHMARKS.md (section
# gpu_check). Without a GPU it says so and exits 0. Details: scripts/gpu_check.py --help.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/python_env.sh"
cd "$ROOT"
# gpu_check.py keeps itself inside a 570 s budget; this outer limit only guards against the driver itself
# hanging (it then ends with no section written)
if command -v timeout >/dev/null 2>&1; then
  exec timeout --kill-after=10 600 "$PY" "$ROOT/scripts/gpu_check.py" "$@"
fi
exec "$PY" "$ROOT/scripts/gpu_check.py" "$@"
