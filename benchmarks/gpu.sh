#!/usr/bin/env bash
# Full GPU benchmark in one go (a few minutes on one H100/H200): step, statistics engines and the
# mask+update kernel on CUDA, then a short quality sweep. Writes benchmarks/results/cuda/*.json
# (with the GPU name) and SUMMARY.md there, and refreshes benchmarks/README.md.
#
#   bash benchmarks/gpu.sh                        # on a machine with a GPU
#   DEVICE=cpu bash benchmarks/gpu.sh --quick     # dry run on CPU (what the tests do)
#
# Environment: PYTHON (default: python3, or python), DEVICE (default cuda), OUT (default
# benchmarks/results/cuda, or .../cuda/quick with --quick; benchmarks/results/cpu-dry-run[/quick]
# when DEVICE=cpu, so a dry run never overwrites the CPU figures). Extra arguments go to run_all.py.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
DEVICE="${DEVICE:-cuda}"

quick=""
for a in "$@"; do [[ "$a" == "--quick" ]] && quick="/quick"; done
if [[ "$DEVICE" == cuda* ]]; then
    OUT="${OUT:-benchmarks/results/cuda${quick}}"
    "$PYTHON" - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu.sh: torch.cuda.is_available() is False; run with DEVICE=cpu for a dry run")
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
else
    OUT="${OUT:-benchmarks/results/cpu-dry-run${quick}}"
fi

readme=()
if [[ -z "$quick" && "$DEVICE" == cuda* && "$OUT" == "benchmarks/results/cuda" ]]; then
    readme=(--readme benchmarks/README.md)
fi

# The quality sweep is about the optimizer, not the GPU: one seed, two learning rates.
exec "$PYTHON" benchmarks/run_all.py --device "$DEVICE" --out "$OUT" "${readme[@]}" \
    --quality-args "--seeds 0 --lrs 0.01,0.1" "$@"
