#!/usr/bin/env bash
# Sets up fsdfm in ./.venv: PyTorch (CPU build 2.13.0 unless TORCH_SPEC says otherwise), the
# test and benchmark tools, and the compiled kernels (fsdfm._C, built in place).
#   TORCH_SPEC="torch==2.11.0" bash scripts/setup.sh     # another torch (CUDA kernels need nvcc)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${FSDFM_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
# torch first and pinned: an unpinned torch would pull several GB of CUDA wheels.
"$py" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
"$py" -m pip install -q setuptools wheel ninja numpy tqdm tiktoken safetensors pyyaml tokenizers matplotlib huggingface_hub rich transformers pytest pytest-benchmark hypothesis scipy ruff
MAX_JOBS=${MAX_JOBS:-2} "$py" -m pip install -q --no-build-isolation --no-deps -e .
"$py" -c "import fsdfm.ops as o; assert o.native_available(), 'fsdfm._C did not build'; print('fsdfm ready: native kernels for', 'cpu + cuda' if o.native_available('cuda') else 'cpu')"
