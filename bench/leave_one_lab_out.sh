#!/bin/bash
# Leave-one-lab-out scoring of the diffusion classifier, the reference and the reported (combined)
# class, after the trainings (analysis/MODEL_CARD.md, "Leave-one-lab-out"):
#   cytonode train --data ../shared/data --labs pbc,chula --init WAVE1 --out .train/diff_no_bccd \
#       --steps 4000 --t-min 100 --t-max 500 --threads 1 --lr 2e-4   (likewise pbc,bccd -> diff_no_chula)
#   python -m analysis.training.reference_train --labs pbc,chula --out .train/ref_no_bccd.safetensors \
#       --steps 1500 --threads 1                                       (likewise pbc,bccd -> ref_no_chula)
# Then: bench/leave_one_lab_out.sh [DATA] ; writes .train/lolo_no_LAB/{calibrate,eval_test}.json
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=$(realpath "${1:-../shared/data}")
for lab in bccd chula; do
  d=.train/lolo_no_$lab
  bench/lolo_weights_folder.sh "$lab" ".train/ref_no_$lab.safetensors" ".train/diff_no_$lab" "$d" "$DATA"
  .venv/bin/python -m analysis.training.evaluate_labs --data "$DATA" --weights "$d/w" --labs "$lab" \
      --split test --diffusion-weight 0.4 --threads 2 --out "$d/eval_test.json" > /dev/null
done
