#!/usr/bin/env bash
# The committed runs under results/ and the rendered leaderboard, from the shipped Fashion-MNIST models.
# CPU budgets: 100 examples per model with the `lite` suite (the full protocol at reduced AutoAttack
# budgets); the entropy-reduction runs use the quick suite on 20 examples, with and without the defense
# (the defense costs ~10x an undefended forward and is attacked in three modes).
# Runs are independent: the ones already finished are reused, so the script can be re-run or split.
set -euo pipefail
cd "$(dirname "$0")/.."
B=.venv/bin/bench
for m in deq-tiny deq-tiny-ris resnet-tiny; do
  $B evaluate --model "$m" --suite lite --n-examples 100 --quiet
done
for m in deq-tiny deq-tiny-ris; do
  $B evaluate --model "$m" --suite quick --n-examples 20 --batch-size 20 --defense entropy-reduction --quiet
  $B evaluate --model "$m" --suite quick --n-examples 20 --batch-size 20 --quiet
done
# issue #6's Done-when: the full white-box suite (standard AutoAttack budgets) through the defense, at CPU
# size: 2 examples, 16 dev examples, with and without the defense (they share one cached sweep). One image
# that survives everything costs ~90 min on one core defended (3 attack modes), ~10 min undefended.
# (results/deq-tiny-4d4bcead04d5ba6c.json is an earlier undefended white-box run: 10 images, --n-dev 32,
# --batch-size 5, code 0.1.0, when Square still ran once per estimator.)
for m in deq-tiny deq-tiny-ris; do
  for d in entropy-reduction none; do
    $B evaluate --model "$m" --suite white-box --n-examples 2 --n-dev 16 --batch-size 2 --defense "$d" --quiet
  done
done
$B leaderboard --format md --output results/leaderboard.md
$B leaderboard --format html --output results/leaderboard.html
$B leaderboard --format json --output results/leaderboard.json
$B leaderboard --format latex --output results/leaderboard.tex
$B leaderboard --view gap --format md --output results/gap.md
$B leaderboard --view runs --format md --output results/runs.md
# the papers' claims beside the measurements; also draws results/plots/findings-*.{png,svg}, which it links
$B leaderboard --view findings --format md --output results/findings.md
$B plot --out results/plots
