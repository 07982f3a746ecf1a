#!/bin/bash
# The linear benchmark under client-level DP: FlexLoRA (the default server step) and FedIT at the lowest rank,
# 400 clients (one task each), 100 per round (q = 0.25), 10 rounds, clip norm 0.5, 3 seeds, at four noise levels
# and without DP. Then the table and plot: python -m experiments.privacy_curve docs/experiments/linear-dp
set -e
cd "$(dirname "$0")/../../.."
common=(--clients 400 --per-round 100 --rounds 10 --distribution heavy-tail-light --strategy flexlora-carry --strategy fedit --seed 0 --seed 1 --seed 2 --out docs/experiments/linear-dp)
nice .venv/bin/flexlora sim linear "${common[@]}" --name no-dp
for z in 0.7 1.2 2.2 4.0; do
  nice .venv/bin/flexlora sim linear "${common[@]}" --dp-clip-norm 0.5 --dp-noise-multiplier "$z" --name "z-$z"
done
nice .venv/bin/python -m experiments.privacy_curve docs/experiments/linear-dp
