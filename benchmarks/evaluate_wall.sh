#!/usr/bin/env bash
# Wall time of one `bench evaluate` at two commits, both sides at the same time (one core each, one torch
# thread), each in its own git worktree and its own results directory (nothing reused, no cached sweep),
# then each record's All and the per-attack seconds it stores (#16: the white-box suite against the
# issue's starting commit). Only the ratio counts; start it on an otherwise idle machine, or lower the
# other sessions' autogroups (Linux shares the CPU equally between sessions, whatever their nice).
#
#   benchmarks/evaluate_wall.sh BEFORE_COMMIT [AFTER_COMMIT=HEAD] -- evaluate arguments...
#   benchmarks/evaluate_wall.sh da451e9 HEAD -- --model deq-tiny --suite white-box --n-examples 4 --batch-size 4
set -euo pipefail
cd "$(dirname "$0")/.."
before=$1
after=HEAD
shift
if [ "${1:-}" != "--" ]; then after=$1; shift; fi
[ "${1:-}" = "--" ] || { echo "usage: $0 BEFORE [AFTER] -- evaluate arguments" >&2; exit 2; }
shift
py=${PYTHON:-$PWD/.venv/bin/python}
work=$(mktemp -d)
trap 'git worktree remove --force "$work/before" 2>/dev/null; git worktree remove --force "$work/after" 2>/dev/null; rm -rf "$work"' EXIT
git worktree add -q --detach "$work/before" "$before"
git worktree add -q --detach "$work/after" "$after"
export OMP_NUM_THREADS=1
side() {  # side NAME ARGS...: run the evaluation in that worktree, write NAME.wall
  local name=$1 s e
  shift
  s=$(date +%s.%N)
  (cd "$work/$name" && PYTHONPATH="$work/$name" "$py" -m bench evaluate "$@" \
    --results-dir "$work/$name-results" --quiet) > "$work/$name.log" 2>&1 \
    || { echo "$name failed:"; tail -n 5 "$work/$name.log"; return 1; }
  e=$(date +%s.%N)
  echo "$e - $s" | bc > "$work/$name.wall"
}
side before "$@" & b=$!
side after "$@" & a=$!
wait $b && wait $a
"$py" - "$work" "$before" "$after" <<'EOF'
import json, sys
from pathlib import Path

work, names = Path(sys.argv[1]), {"before": sys.argv[2], "after": sys.argv[3]}
walls = {}
for side, commit in names.items():
    (record,) = sorted((work / f"{side}-results").glob("*.json"))
    doc = json.loads(record.read_text())
    cols = doc["results"]["columns"]
    n = len(cols["label"])
    robust = [True] * n
    for col in cols["attacks"]:
        robust = [r and not b for r, b in zip(robust, col["broken"])]
    clean = cols["clean"]["final"]["pred"]
    robust = [r and c == y for r, c, y in zip(robust, clean, cols["label"])]
    walls[side] = float((work / f"{side}.wall").read_text())
    secs = doc["provenance"].get("attack_seconds") or []
    if isinstance(secs, dict):
        secs = [{"attack": k, "seconds": v} for k, v in secs.items()]
    by_attack: dict[str, float] = {}
    for s in secs:
        by_attack[s["attack"]] = by_attack.get(s["attack"], 0.0) + float(s["seconds"])
    print(f"{side} {commit}: wall {walls[side]:.0f} s, All (every attack column, readout final) "
          f"{100 * sum(robust) / n:.1f}% of {n}")
    for attack, seconds in sorted(by_attack.items(), key=lambda kv: -kv[1]):
        print(f"    {attack:<28}{seconds:>10.1f} s")
print(f"after / before wall time: {walls['after'] / walls['before']:.2f}")
EOF
