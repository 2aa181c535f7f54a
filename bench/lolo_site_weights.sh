#!/bin/bash
# Weights folders of models trained without one lab, for measurements at a lab never trained on
# (analysis/training/few_shot.py --diffusion, analysis/training/site_readable.py posteriors):
# .train/lolo_site/no_LAB/w holds the committed step-2,000 diffusion checkpoint trained without LAB
# (analysis/weights/training/lolo_no_LAB), the seed-2 reference trained without it, and the
# calibration on the val splits of the labs both trained on (as bench/leave_one_lab_out.sh).
# The references first (about 27 minutes each on one core):
#   python -m analysis.training.reference_train --labs pbc,bccd --seed 2 --steps 1500 --threads 1 \
#       --out .train/ms/ref_no_chula_base_s2.safetensors        (--labs pbc,chula: ref_no_bccd_base_s2)
# Then: bench/lolo_site_weights.sh [DATA]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=$(realpath "${1:-../shared/data}")
for lab in ${LABS:-chula bccd}; do
  d=.train/lolo_site/no_$lab
  mkdir -p "$d/data" "$d/w"
  ln -sfn "$DATA/pbc" "$d/data/pbc"
  if [ "$lab" = bccd ]; then ln -sfn "$DATA/chula_wbc" "$d/data/chula_wbc"; else ln -sfn "$DATA/bccd" "$d/data/bccd"; fi
  cp ".train/ms/ref_no_${lab}_base_s2.safetensors" "$d/w/reference_effnet.safetensors"
  .venv/bin/python -c "from pathlib import Path; from analysis.training.train import export_weights; \
export_weights(Path('analysis/weights/training/lolo_no_$lab'), Path('$d/w/cytodiffusion.safetensors'))"
  .venv/bin/cytonode evaluate --calibrate --json --weights "$d/w" --data "$d/data/pbc" --per-class 48 \
      --threads 2 > "$d/calibrate.json"
done
