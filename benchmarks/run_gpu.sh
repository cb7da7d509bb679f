#!/usr/bin/env bash
# Everything that needs a GPU, in one device call (the lent machine has torch 2.11+cu130, pytest,
# pytest-benchmark, scipy, tiktoken, safetensors): build the CUDA extension, run the CUDA tests,
# run the benchmarks, and leave logs and pytest-benchmark JSON under $OUT (default:
# benchmarks/results/<device>/), to be committed with the device name.
#   bash benchmarks/run_gpu.sh                 # everything
#   bash benchmarks/run_gpu.sh -k jump_step    # extra pytest arguments go to the benchmarks
set -uo pipefail
cd "$(dirname "$0")/.."
device=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
out=${OUT:-benchmarks/results/$device}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
echo "device: $device"
FSDFM_CUDA=1 MAX_JOBS=16 python3 setup.py -q build_ext --inplace > "$out/build.log" 2>&1 \
  || { tail -40 "$out/build.log"; exit 1; }
python3 -m pytest tests -q -m cuda -x 2>&1 | tee "$out/tests_cuda.log" | tail -15
tests=${PIPESTATUS[0]}
python3 -m pytest benchmarks -q -k cuda --benchmark-json="$out/benchmarks.json" \
  --benchmark-columns=min,median,mean,stddev,rounds "$@" 2>&1 | tee "$out/benchmarks.log" | tail -40
bench=${PIPESTATUS[0]}
echo "cuda tests exit $tests, benchmarks exit $bench; results in $out"
exit $(( tests != 0 || bench != 0 ))
