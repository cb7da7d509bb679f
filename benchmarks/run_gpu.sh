#!/usr/bin/env bash
# Everything that needs a GPU, in one device call (the lent machine has torch 2.11+cu130, pytest,
# pytest-benchmark, scipy, tiktoken, safetensors, transformers): build the CUDA extension (unless
# an fsdfm/_C*.so with CUDA kernels is already there), then at once the CUDA tests, the ops under
# compute-sanitizer's memcheck and an optional job that shares the GPU (ALONGSIDE, a command:
# a reproduction, say), then, alone on the GPU, the benchmarks. Logs and pytest-benchmark JSON go
# to $OUT (default: benchmarks/results/<device>/), to be committed with the device name.
#   bash benchmarks/run_gpu.sh                 # everything
#   bash benchmarks/run_gpu.sh -k jump_step    # extra pytest arguments go to the benchmarks
#   ALONGSIDE="python3 scripts/reproduce.py markov" bash benchmarks/run_gpu.sh
# Each stage has a time limit (seconds: TESTS_S, MEMCHECK_S, ALONGSIDE_S, BENCH_S), so that a
# lease ends with every log, whatever hangs. The benchmarks end with summary.json and README.md
# beside their JSON (benchmarks/summary.py; summary.json also in benchmarks/results/).
set -uo pipefail
cd "$(dirname "$0")/.."
device=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
out=${OUT:-benchmarks/results/$device}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
echo "device: $device; torch $(python3 -c 'import torch; print(torch.__version__)')"
has_cuda_kernels() { python3 -c "import fsdfm.ops as o; assert o.native_available('cuda')" 2>/dev/null; }
if ! has_cuda_kernels; then
  start=$SECONDS
  FSDFM_CUDA=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
    python3 setup.py -q build_ext --inplace > "$out/build.log" 2>&1 \
    || { tail -40 "$out/build.log"; exit 1; }
  echo "built the extension in $((SECONDS - start)) s"
fi
has_cuda_kernels || { echo "fsdfm._C has no CUDA kernels"; exit 1; }

alongside=0
if [ -n "${ALONGSIDE:-}" ]; then
  timeout "${ALONGSIDE_S:-300}" bash -c "$ALONGSIDE" > "$out/alongside.log" 2>&1 &
  alongside=$!
fi
timeout "${MEMCHECK_S:-240}" compute-sanitizer --tool memcheck --error-exitcode 3 \
  python3 -m pytest tests/test_ops_api.py tests/test_head.py -q -m cuda -p no:cacheprovider \
  -k "edge_rows or invalid_rows or matches_reference or merge or opcheck" \
  > "$out/memcheck.log" 2>&1 &
memcheck=$!
timeout "${TESTS_S:-240}" python3 -m pytest tests -q -m cuda -p no:cacheprovider \
  --durations=10 > "$out/tests_cuda.log" 2>&1
tests=$?
tail -25 "$out/tests_cuda.log"
wait $memcheck
mem=$?
echo "memcheck exit $mem:"; tail -5 "$out/memcheck.log"
along=0
if [ "$alongside" != 0 ]; then
  wait "$alongside"
  along=$?
  echo "alongside exit $along:"; tail -5 "$out/alongside.log"
fi
# The ops and the fused head first (short), then whole generations against the peers (long:
# compiles, 1,024-step runs, autoregressive decoding); one JSON for both, summarised at the end.
timeout "${BENCH_S:-480}" python3 -m pytest benchmarks -q -k cuda -p no:cacheprovider \
  --benchmark-json="$out/benchmarks.json" --benchmark-columns=min,median,mean,stddev,rounds "$@" \
  > "$out/benchmarks.log" 2>&1
bench=$?
tail -40 "$out/benchmarks.log"
python3 benchmarks/summary.py "$out" > /dev/null && cp "$out/summary.json" benchmarks/results/ \
  && echo "summary: $(cat "$out/summary.json" | tr -d '\n ')"
echo "cuda tests exit $tests, memcheck exit $mem, alongside exit $along, benchmarks exit $bench"
exit $(( tests != 0 || mem != 0 || along != 0 || bench != 0 ))
