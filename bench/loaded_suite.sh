#!/usr/bin/env bash
# The test suite on a loaded machine: one CPU hog per core while the whole suite runs.
#
#   bench/loaded_suite.sh [RUNS] [pytest args...]     e.g.  bench/loaded_suite.sh 3
#
# Each run starts one busy-loop process per core (nproc), runs the suite with
# .venv/bin/python -m pytest -q -p no:cacheprovider, stops the hogs by their PIDs and
# reports pass/fail, the wall time and the failing tests. The hogs bound themselves in time
# (HOG_LIMIT_S, default 1800 s) in case this script is killed before it can stop them;
# the suite is bounded too (SUITE_LIMIT_S, default 1800 s). HOGS=0 runs the suite idle.
# Exit code: 0 when every run passed. Output of run N: $OUT/run-N.txt (default /tmp).
set -u
cd "$(dirname "$0")/.."

RUNS=${1:-1}
shift || true
HOGS=${HOGS:-$(nproc)}
HOG_LIMIT_S=${HOG_LIMIT_S:-1800}
SUITE_LIMIT_S=${SUITE_LIMIT_S:-1800}
OUT=${OUT:-$(mktemp -d /tmp/loaded-suite.XXXXXX)}
mkdir -p "$OUT"
PYTHON=.venv/bin/python
[ -x "$PYTHON" ] || { echo "no $PYTHON: run python3 dev.py test once first" >&2; exit 2; }

hogs=()
stop_hogs() {
    for pid in "${hogs[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${hogs[@]}"; do wait "$pid" 2>/dev/null; done
    hogs=()
}
trap stop_hogs EXIT
trap 'exit 130' INT TERM

failed_runs=0
for run in $(seq 1 "$RUNS"); do
    for _ in $(seq 1 "$HOGS"); do
        "$PYTHON" -c "import time
end = time.monotonic() + $HOG_LIMIT_S
while time.monotonic() < end:
    pass" &
        hogs+=("$!")
    done
    log="$OUT/run-$run.txt"
    start=$(date +%s%N)
    timeout --signal=TERM --kill-after=30 "$SUITE_LIMIT_S" \
        "$PYTHON" -m pytest -q -p no:cacheprovider "$@" >"$log" 2>&1
    code=$?
    wall=$(( ($(date +%s%N) - start) / 1000000000 ))
    stop_hogs
    summary=$(grep -E '(passed|failed|error).* in [0-9.]+s' "$log" | tail -1 | tr -d '=')
    if [ "$code" -eq 0 ]; then verdict=PASS; else verdict=FAIL; failed_runs=$((failed_runs + 1)); fi
    printf 'run %d/%d: %s (exit %d) in %d s with %d hogs: %s  [%s]\n' \
        "$run" "$RUNS" "$verdict" "$code" "$wall" "$HOGS" "${summary:- no summary}" "$log"
    grep -E '^(FAILED|ERROR) ' "$log" | sed 's/^/    /'
done
echo "loaded suite: $((RUNS - failed_runs))/$RUNS runs passed"
[ "$failed_runs" -eq 0 ]
