#!/bin/bash
# One weights folder of models trained without LAB, calibrated on the val splits of the labs they
# trained on: bench/lolo_weights_folder.sh LAB REFERENCE DIFFUSION OUT_DIR DATA
# (DIFFUSION: a training checkpoint folder, whose EMA weights are exported, or exported weights)
# (used by bench/leave_one_lab_out.sh and bench/lolo_site_weights.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
lab=$1 reference=$2 checkpoint=$3 d=$4 DATA=$5
mkdir -p "$d/data" "$d/w"
ln -sfn "$DATA/pbc" "$d/data/pbc"   # the calibration reads val of pbc and the lab beside it only
if [ "$lab" = bccd ]; then ln -sfn "$DATA/chula_wbc" "$d/data/chula_wbc"; else ln -sfn "$DATA/bccd" "$d/data/bccd"; fi
cp "$reference" "$d/w/reference_effnet.safetensors"
if [ -f "$checkpoint" ]; then
  cp "$checkpoint" "$d/w/cytodiffusion.safetensors"
else
  .venv/bin/python -c "from pathlib import Path; from analysis.training.train import export_weights; \
export_weights(Path('$checkpoint'), Path('$d/w/cytodiffusion.safetensors'))"
fi
.venv/bin/cytonode evaluate --calibrate --json --weights "$d/w" --data "$d/data/pbc" --per-class 48 \
    --threads 2 > "$d/calibrate.json"
