#!/bin/bash
# A fine-tuned site's verification, out of fold (criterion of 2026-12-06 07:51, analysis/training/criteria.txt):
# for each fine-tuned draw of the seventeenth session's runs at a held-out LAB (Chula draws 11-14, BCCD 12-14; the
# same leave-one-lab-out models, named cells and seeds as RULE=matched bench/site_finetune_ruled.sh), the named
# cells' verification read with the shipped diffusion classifier (as calibrate-site did) and with the fine-tuned one
# out of fold (site_adapt.out_of_fold_diffusion), each beside the site network's out-of-fold posteriors; then both
# against the balanced accuracy the site's reported class scored on LAB's val + test in those runs
# (.train/matched*/LAB_ruled_sN.json, row "DFT always rule weight"; run that script first where one is missing).
# Usage: bench/site_verify_folds.sh LAB [THREADS] [DATA]   (about 10 minutes a draw on one thread)
# Writes .train/verify_folds/LAB_sN.json and prints the table; bench/site_verify_folds.sh summary prints both labs'.
set -euo pipefail
cd "$(dirname "$0")/.."
out=.train/verify_folds
mkdir -p "$out"
lab=${1:?chula, bccd or summary}
if [ "$lab" != summary ]; then
  threads=${2:-1}
  DATA=$(realpath "${3:-../shared/data}")
  draws=$([ "$lab" = chula ] && echo "11 12 13 14" || echo "12 13 14")
  for seed in $draws; do
    [ -f "$out/${lab}_s$seed.json" ] || .venv/bin/python -m analysis.training.few_shot --data "$DATA" \
        --threads "$threads" --lab "$lab" --reference ".train/ms/ref_no_${lab}_base_s2.safetensors" \
        --pack ".train/ms/pack_no_$lab.safetensors" --diffusion ".train/lolo_recipe/no_${lab}_measure/w" \
        --seed "$seed" --finetune 200 --diffusion-finetune 300 --clearly --verify-folds --out "$out/${lab}_s$seed.json"
  done
fi
.venv/bin/python - "$out" <<'PY'
import glob, json, sys
from pathlib import Path
rows = []
for f in sorted(glob.glob(f"{sys.argv[1]}/*_s*.json")):
    v = json.loads(Path(f).read_text())
    scored_file = next(p for p in sorted(glob.glob(f".train/matched*/{v['lab']}_ruled_s{v['seed']}.json")))
    scored = json.loads(Path(scored_file).read_text())["site network"]["k=10"]["reported"]["DFT always rule weight"]
    if not v.get("finetuned"):  # verified as calibrate-site does; nothing out of fold to compare
        print(f"{Path(f).stem}: not fine-tuned, verified {v['verified']['balanced_accuracy']:.3f} "
              f"({v['verified']['low']:.3f}-{v['verified']['high']:.3f}), scored {scored['balanced_accuracy']:.3f}")
        continue
    rows.append((Path(f).stem, v["verified"]["balanced_accuracy"], v["verified_out_of_fold"]["balanced_accuracy"],
                 scored["balanced_accuracy"], v["verified_out_of_fold"]["low"], v["verified_out_of_fold"]["high"]))
print("run        shipped-read  out-of-fold (95 % interval)  scored val+test")
for name, a, b, s, lo, hi in rows:
    print(f"{name:10s} {a:12.3f}  {b:11.3f} ({lo:.3f}-{hi:.3f})  {s:15.3f}")
if rows:
    n = len(rows)
    mae = lambda i: sum(abs(r[i] - r[3]) for r in rows) / n
    bias = lambda i: sum(r[i] - r[3] for r in rows) / n
    print(f"mean |verified - scored|: shipped read {mae(1):.3f}, out of fold {mae(2):.3f}")
    print(f"mean (verified - scored): shipped read {bias(1):+.3f}, out of fold {bias(2):+.3f}")
    bad = [r[0] for r in rows if r[2] >= 0.85 and r[3] < 0.80]
    print(f"verified >= 85 % out of fold while scored < 80 %: {bad or 'none'}")
    print(f"criterion (a) {mae(2) < mae(1)}, (b) {bias(2) <= 0.03}, (c) {not bad}  [{n} runs]")
PY
