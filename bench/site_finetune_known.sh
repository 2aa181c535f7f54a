#!/bin/bash
# DFT+FT (criterion of 2026-12-05 23:47, analysis/training/criteria.txt) at the labs the shipped models
# trained on: 10 named cells a class from each lab's train split (seed 0), the site's cells its val
# split, scored on val (PBC: 48 a class). Prints, per lab, whether the gate opened and the reported
# class's balanced accuracy as shipped and with both fine-tunes. About 15 minutes a lab on one thread.
# Usage: bench/site_finetune_known.sh [THREADS] [DATA]; writes .train/dftft_known/LAB.json
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-1}
DATA=$(realpath "${2:-../shared/data}")
mkdir -p .train/dftft_known
for lab in pbc bccd chula; do
  extra=$([ "$lab" = pbc ] && echo "--per-class 48" || echo "")
  # shellcheck disable=SC2086  # $extra is empty or two words
  [ -f .train/dftft_known/$lab.json ] || .venv/bin/python -m analysis.training.few_shot --data "$DATA" \
    --lab $lab --reference analysis/weights/reference_effnet.safetensors \
    --pack analysis/weights/site_source.safetensors --diffusion analysis/weights --score-splits val \
    --adapt-splits val $extra --seed 0 --threads "$threads" --finetune 200 --diffusion-finetune 300 \
    --out .train/dftft_known/$lab.json
done
.venv/bin/python - <<'PY'
import json
for lab in ("pbc", "bccd", "chula"):
    r = json.load(open(f".train/dftft_known/{lab}.json"))["site network"]["k=10"]
    rep = r["reported"]
    tuned = rep.get("DFT rule weight", rep["R0 rule weight"])
    print(f"{lab}: gate {'open' if r['gate']['used'] else 'shut'} ({r['gate']['shipped_cv']} shipped, "
          f"{r['gate']['site_cv']} fine-tuned, cross-validated); reported class on val "
          f"{rep['shipped network, rule weight']['balanced_accuracy']:.3f} as shipped, "
          f"{tuned['balanced_accuracy']:.3f} with both fine-tunes")
PY
