#!/usr/bin/env bash
# Every GPU test, in one call, on a GPU machine (CI has no GPU: there they skip).
#
#   scripts/gpu_check.sh [pytest args...]      e.g. scripts/gpu_check.sh -x -k graphs
#
# Python: $PYTHON, else the repo's .venv, else python3 on PATH (on the lent H200:
# /opt/torch/.venv/bin/python3, where the repo is not pip-installed: PYTHONPATH
# points at the checkout, for the tests and for the ranks that mpirun starts).
# mpirun: $MPIRUN, else the one on PATH (there: Debian Open MPI, /usr/bin/mpirun).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=$(command -v python3); fi
fi
export MPIRUN=${MPIRUN:-$(command -v mpirun || echo /usr/bin/mpirun)}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PPRUNTIME_DEVICE=cuda
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

shopt -s nullglob
tests=()
for file in tests/test_gpu*.py tests/test_*kernels*.py tests/test_device_sampler*.py tests/test_skinny_gemm*.py; do
    tests+=("$file")
done
echo "python: $PYTHON   mpirun: $MPIRUN"
"$PYTHON" - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO GPU VISIBLE")
PY
echo "tests: ${tests[*]}"
exec "$PYTHON" -m pytest "${tests[@]}" -q -rs "$@"
