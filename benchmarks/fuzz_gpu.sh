#!/usr/bin/env bash
# The runtime fuzzer's bf16 seeds on the GPU, spread over the host's cores, every line into one log
# ($OUT/fuzz.log, or ./fuzz.log): what a seed printed survives a timeout.
#     bash benchmarks/fuzz_gpu.sh [SEEDS=200] [PROCESSES=16] [SECONDS=540]
set -uo pipefail
cd "$(dirname "$0")/.."
seeds="${1:-200}"; procs="${2:-16}"; limit="${3:-540}"
log="${OUT:-.}/fuzz.log"
: > "$log"
export OMP_NUM_THREADS=1
for i in $(seq 0 $((procs - 1))); do  # seeds i, i+procs, ...: slow and fast seeds mixed in every process
    list=$(seq -s, "$i" "$procs" $((seeds - 1)))
    timeout "$limit" python3 -u tests/runtime_fuzz.py --seeds "$list" --device cuda -v 2>&1 \
        | grep --line-buffered -v '^W[0-9]' >> "$log" &
done
wait
echo "fuzz seeds run: $(grep -cE '^seed [0-9]+: (ok|FAIL|refused)' "$log") of $seeds"
grep -E '^seed [0-9]+: (FAIL|refused)' "$log" | sort -t' ' -k2n || echo "fuzz: no failing or refused seed"
grep -E '^  seed [0-9]+ mode none .*(value|nan|mutation) err' "$log" | sort -u | head -20
