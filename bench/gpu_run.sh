#!/usr/bin/env bash
# The GPU check on a GPU machine that has PyTorch but no internet: the wheels the check needs and
# the machine lacks travel in .whl/ (git-ignored), and install from there into a temporary folder.
#
#   bash bench/gpu_run.sh --fetch              # where PyPI is reachable: download them into .whl/
#   bash bench/gpu_run.sh OUT [gpu_check flags] # on the GPU machine: install from .whl/ offline, check into OUT
#
# What travels: lpips 0.1.4 (the DM step's regression loss; its own linear weights are inside the
# wheel, its VGG is random in the check, so nothing downloads). Its dependencies (torch, torchvision,
# numpy, scipy, tqdm) and the check's (matplotlib, scikit-learn, einops, pillow) are on the GPU
# image and do not travel; torch-fidelity is not used by the check.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(lpips==0.1.4)  # one version of each, --no-deps: every dependency is named above

if [ "${1:-}" = "--fetch" ]; then
  mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
  ls -1 .whl
  exit 0
fi
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash bench/gpu_run.sh --fetch | bash bench/gpu_run.sh OUT [gpu_check.py flags]" >&2
  exit 2
fi
OUT=$1
shift
if ! ls .whl/*.whl >/dev/null 2>&1; then
  echo "error: no wheels in .whl/: run 'bash bench/gpu_run.sh --fetch' where PyPI is reachable, then bring .whl/ along" >&2
  exit 2
fi
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export GPU_RUN_WHEELS="installed from .whl/: $(cd .whl && ls *.whl | tr '\n' ' ')"  # run.json records it
python3 -c "import sys, torch, lpips; print(f'python {sys.version.split()[0]}, torch {torch.__version__}, lpips from {lpips.__file__}')"
python3 bench/gpu_check.py --out "$OUT" "$@"
