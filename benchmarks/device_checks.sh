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

fuzz_dir="$(mktemp -d)"
for i in $(seq 0 9); do  # seeds 0-199 in ten processes
    timeout "$limit" python3 tests/runtime_fuzz.py --seeds "$((i * 20))-$((i * 20 + 19))" --device cuda -v \
        > "$fuzz_dir/p$i.log" 2>&1 &
done
timeout "$limit" python3 -m pytest "${common[@]}" > "$out/gpu_suite.log" 2>&1 &
KUNLUN_COMPILE_CHECK_REPLAYS=1 timeout "$limit" python3 -m pytest "${common[@]}" > "$out/gpu_suite_checked.log" 2>&1 &
wait
cat "$fuzz_dir"/p*.log > "$out/fuzz.log"  # one file: the device tool returns a limited number of files

echo "gpu suite:         $(tail -n 1 "$out/gpu_suite.log")"
echo "gpu suite checked: $(tail -n 1 "$out/gpu_suite_checked.log")"
echo "fuzz seeds run:    $(grep -cE '^seed [0-9]+: (ok|FAIL|refused)' "$out/fuzz.log") of 200"
grep -E '^seed [0-9]+: (FAIL|refused)' "$out/fuzz.log" || echo "fuzz: no failing or refused seed"
