#!/usr/bin/env bash
# The GPU path in one call, for the first lent GPU (issue #16.6): under 8 minutes in all.
#
#   1. the tests marked `cuda` (tests/test_cuda.py: CPU/CUDA agreement, batch independence, PGD claims,
#      a quick evaluate on the micro model)                                              limit 150 s
#   2. one quick evaluate of deq-tiny on the GPU (100 examples, its own dev set)         limit 120 s
#   3. papers-vs-ours PGD-10 on MDEQ-Large on the GPU (benchmarks/papers_vs_ours.py mdeq, their random
#      weights in both, interleaved batch by batch), when a checkout of the papers' repository is at
#      $PAPERS_REPO (default scratch/papers: /scratch is git-ignored, so a device run carries it with
#      `carry: ["scratch/papers"]`)                                                       limit 200 s
#
# Then one summary table: each step's status and seconds, and the lines that carry its numbers.
#
#   PY=.venv/bin/python PAPERS_REPO=scratch/papers N=64 BATCH=32 benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
PAPERS_REPO=${PAPERS_REPO:-scratch/papers}
N=${N:-64}
BATCH=${BATCH:-32}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu N=2 BATCH=2: a dry run of the script itself on a machine without a GPU
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.tsv"
: >"$SUMMARY"

step() {  # step NAME LIMIT_SECONDS COMMAND...: run it, log its output, add a summary row
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS rc
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    local status=ok
    [ "$rc" -eq 124 ] && status="timeout (${limit} s)"
    [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && status="failed (rc $rc)"
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >>"$SUMMARY"
}

if [ "$DEVICE" = cuda ]; then
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" \
        >"$OUT/device.log" 2>&1 || { cat "$OUT/device.log"; echo "gpu_check: no CUDA device"; exit 2; }
else
    echo "$DEVICE (dry run)" >"$OUT/device.log"
fi

step cuda-tests 150 "$PY" -m pytest -q -m cuda tests/test_cuda.py
step evaluate-deq-tiny 120 "$PY" -m bench evaluate --model deq-tiny --suite quick --n-examples 100 \
    --batch-size 100 --device "$DEVICE" --results-dir "$OUT/results" --quiet
if [ -d "$PAPERS_REPO" ]; then
    step papers-vs-ours 200 "$PY" benchmarks/papers_vs_ours.py mdeq --papers-repo "$PAPERS_REPO" \
        --device "$DEVICE" --n "$N" --batch "$BATCH"
else
    printf 'papers-vs-ours\tskipped (no checkout at %s)\t0\n' "$PAPERS_REPO" >>"$SUMMARY"
fi

echo
echo "GPU check on $(cat "$OUT/device.log"); logs in $OUT"
printf '%-20s %-32s %8s\n' step status seconds
while IFS=$'\t' read -r name status secs; do
    printf '%-20s %-32s %8s\n' "$name" "$status" "$secs"
done <"$SUMMARY"
echo
echo "cuda tests:      $(tail -n 1 "$OUT/cuda-tests.log" 2>/dev/null)"
record=$(ls "$OUT"/results/*.json 2>/dev/null | head -n 1)
if [ -n "$record" ]; then
    "$PY" - "$record" <<'EOF'
import json, sys
doc = json.load(open(sys.argv[1]))
s = doc["results"]["summary"]["readouts"]["final"]
print(f"deq-tiny quick:  clean {s['clean_acc']:.1f}%, All {s['all_acc']:.1f}% (n 100, {doc['provenance'].get('device', '')})")
EOF
else
    echo "deq-tiny quick:  no record ($(tail -n 1 "$OUT/evaluate-deq-tiny.log" 2>/dev/null))"
fi
if [ -f "$OUT/papers-vs-ours.log" ]; then
    echo "papers vs ours (MDEQ-Large, PGD-10 8/255, n $N, batch $BATCH):"
    grep -E "^(MDEQ|estimator|variant|papers|ours)" "$OUT/papers-vs-ours.log" | sed 's/^/  /'
fi
