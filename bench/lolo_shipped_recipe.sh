#!/bin/bash
# The shipped diffusion classifier's recipe without one lab (LAB: chula or bccd), for measuring the
# shipped recipe at a lab it never trained on. The committed leave-one-lab-out checkpoints
# (analysis/weights/training/lolo_no_LAB) stopped at step 2,000 of the first stage; this finishes it
# and runs the two later stages the shipped weights had (analysis/weights/training/README.md):
#   1. to step 4,000 of the two-lab fine-tune (lr 2e-4; its schedule is 4,000 steps long, the shipped
#      run's was 6,000 stopped at 4,000, and AdamW's moments restart on resume);
#   2. 2,000 steps with --strong-augment (lr 1e-4);
#   3. 1,000 steps with --strong-augment --max-shift-um 2 (lr 1e-4).
# About 1 s a step on 2 threads: 5,000 steps, 1.4 hours. Every stage resumes from its checkpoint
# (every 250 steps) when run again, and is skipped once its weights are exported.
# Usage: bench/lolo_shipped_recipe.sh LAB [THREADS]; the weights: .train/lolo_recipe/no_LAB/stage3.safetensors
set -euo pipefail
cd "$(dirname "$0")/.."
lab=${1:?chula or bccd}
threads=${2:-2}
labs=$([ "$lab" = chula ] && echo pbc,bccd || echo pbc,chula)
d=.train/lolo_recipe/no_$lab
mkdir -p "$d/stage1"
common=(--data ../shared/data --labs "$labs" --t-min 100 --t-max 500 --threads "$threads")
if [ ! -f "$d/stage1.safetensors" ]; then
  [ -f "$d/stage1/train_state.json" ] || cp analysis/weights/training/lolo_no_$lab/* "$d/stage1/"
  .venv/bin/cytonode train "${common[@]}" --out "$d/stage1" --steps 4000 --lr 2e-4 \
      --export "$d/stage1.safetensors"
fi
if [ ! -f "$d/stage2.safetensors" ]; then
  .venv/bin/cytonode train "${common[@]}" --init "$d/stage1.safetensors" --out "$d/stage2" \
      --steps 2000 --lr 1e-4 --strong-augment --export "$d/stage2.safetensors"
fi
if [ ! -f "$d/stage3.safetensors" ]; then
  .venv/bin/cytonode train "${common[@]}" --init "$d/stage2.safetensors" --out "$d/stage3" \
      --steps 1000 --lr 1e-4 --strong-augment --max-shift-um 2 --export "$d/stage3.safetensors"
fi
echo "$d/stage3.safetensors"
