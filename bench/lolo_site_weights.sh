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
  bench/lolo_weights_folder.sh "$lab" ".train/ms/ref_no_${lab}_base_s2.safetensors" \
      "analysis/weights/training/lolo_no_$lab" ".train/lolo_site/no_$lab" "$DATA"
done
