#!/usr/bin/env bash
# Everything the GPU must confirm before a runtime or kernel change is resolved, in one device call
# (~9 min on a 16-core H200 host; the device allows 10 per call): the `-m gpu` suite, the same suite with the replay checker on, and
# the runtime fuzzer's 200 bf16 seeds in parallel processes (the fuzzer's `-m gpu` test runs them
# one after another, ~17 min).  Logs go to $OUT (or ./device_checks), one file per job.
#
#     bash benchmarks/device_checks.sh [SECONDS_PER_JOB]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-device_checks}"
limit="${1:-540}"
mkdir -p "$out"
export OMP_NUM_THREADS=1
common=(-m gpu -q -p no:logging -p no:cacheprovider --tb=short -rfE
        --deselect tests/test_runtime_fuzz.py::test_gpu_bf16_sweep tests)

OUT="$out" bash benchmarks/fuzz_gpu.sh 200 10 "$limit" > "$out/fuzz_summary.log" 2>&1 &  # 10 of 16 cores
timeout "$limit" python3 -m pytest "${common[@]}" > "$out/gpu_suite.log" 2>&1 &
KUNLUN_COMPILE_CHECK_REPLAYS=1 timeout "$limit" python3 -m pytest "${common[@]}" > "$out/gpu_suite_checked.log" 2>&1 &
wait

echo "gpu suite:         $(tail -n 1 "$out/gpu_suite.log")"
echo "gpu suite checked: $(tail -n 1 "$out/gpu_suite_checked.log")"
cat "$out/fuzz_summary.log"
