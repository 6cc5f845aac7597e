#!/usr/bin/env bash
# The exact commands that produced checkpoints/{deq-tiny,deq-tiny-ris,deq-tiny-exact,resnet-tiny}.safetensors
# (recipes: bench/train_recipes.py, presets fmnist-tiny-*; provenance: checkpoints/README.md).
# Each run uses one CPU thread; the first three runs were started side by side (`all`), deq-tiny-exact alone later.
# Training states and logs go to scratch/ (git-ignored); rerun a command with --resume to continue.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p scratch checkpoints

run() {  # name preset [extra options]
    local name=$1 preset=$2
    shift 2
    "$PY" -m bench train --preset "$preset" --threads 1 --quiet \
        --out "checkpoints/$name.safetensors" --state "scratch/$name.state.pt" \
        --log "scratch/train-$name.log" "$@"
}

case "${1:-all}" in
    deq-tiny) run deq-tiny fmnist-tiny-deq "${@:2}" ;;
    deq-tiny-ris) run deq-tiny-ris fmnist-tiny-deq-ris "${@:2}" ;;
    resnet-tiny) run resnet-tiny fmnist-tiny-resnet "${@:2}" ;;
    deq-tiny-exact) run deq-tiny-exact fmnist-tiny-deq-exact "${@:2}" ;;
    all)
        run deq-tiny fmnist-tiny-deq &
        run deq-tiny-ris fmnist-tiny-deq-ris &
        run resnet-tiny fmnist-tiny-resnet &
        wait
        ;;
    *) echo "usage: $0 [all|deq-tiny|deq-tiny-ris|resnet-tiny|deq-tiny-exact] [extra bench train options]" >&2; exit 2 ;;
esac
