#!/bin/bash
# The site fine-tunes of the fifteenth session, measured at LAB, a lab the models never trained on
# (criteria of 2026-12-05 23:09, 23:33 and 23:47 in analysis/training/criteria.txt):
#   FT     the site network (calibrate-site --labelled) fine-tuned whole: few_shot --finetune 200
#   DFT    the diffusion classifier fine-tuned on the named cells: few_shot --diffusion-finetune 300
#   DFT+FT both, judged on new draws 3-5 against the shipped design on the same draws
# Each with 10 named cells a class from LAB's train split, scored on its val + test. Runs
# bench/lolo_shipped_measure.sh LAB first (the weights folder, pack and the shipped design's draws 0-2).
# Usage: bench/lolo_site_finetune.sh LAB [THREADS] [DATA]; about 75 minutes a lab on one thread.
set -euo pipefail
cd "$(dirname "$0")/.."
lab=${1:?chula or bccd}
threads=${2:-1}
DATA=$(realpath "${3:-../shared/data}")
bench/lolo_shipped_measure.sh "$lab" "$threads" "$DATA" > /dev/null
out=.train/lolo_recipe/no_${lab}_measure
reference=.train/ms/ref_no_${lab}_base_s2.safetensors
[ -f "$reference" ] || reference=analysis/weights/training/lolo_recipe_no_$lab/reference_effnet.safetensors
common=(--data "$DATA" --lab "$lab" --reference "$reference" --pack ".train/ms/pack_no_$lab.safetensors"
        --diffusion "$out/w" --threads "$threads")
run() {  # name seed options...
  local name=$1 seed=$2; shift 2
  [ -f "$out/${name}_s$seed.json" ] || .venv/bin/python -m analysis.training.few_shot "${common[@]}" \
      --seed "$seed" "$@" --out "$out/${name}_s$seed.json"
}
for seed in 0 1 2; do run ft "$seed" --finetune 200; run dft "$seed" --diffusion-finetune 300; done
for seed in 3 4 5; do run few_shot "$seed"; run dftft "$seed" --finetune 200 --diffusion-finetune 300; done
# Balanced accuracy of the reported class (both models, the rule's weight) on LAB's val + test, its four
# classes other than the basophil, the share flagged uncertain and the error among the rest.
.venv/bin/python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def row(name, seeds, key):
    runs = [json.loads((out / f"{name}_s{s}.json").read_text())["site network"]["k=10"] for s in seeds]
    rs = [r["reported"].get(key, r["reported"]["R0 rule weight"]) for r in runs]  # gate shut: as shipped
    four = [sum(v for c, v in x["recall"].items() if c != "basophil") / 4 for x in rs]
    bal = [x["balanced_accuracy"] for x in rs]
    err = [x["error_among_not_flagged"] for x in rs]
    flag = [x["flagged_uncertain"] for x in rs]
    gate = "".join("o" if r["gate"]["used"] else "-" for r in runs)
    mean = lambda v: sum(v) / len(v)
    print(f"  {name:9s} draws {','.join(map(str, seeds))} gate {gate}: balanced "
          + " ".join(f"{v:.3f}" for v in bal) + f" (mean {mean(bal):.3f}); four classes {mean(four):.3f}; "
          f"flagged {mean(flag):.1%}; error among not flagged {mean(err):.2%}")
print(out.name)
row("few_shot", (0, 1, 2), "R0 rule weight")
row("ft", (0, 1, 2), "R0 rule weight")
row("dft", (0, 1, 2), "DFT rule weight")
row("few_shot", (3, 4, 5), "R0 rule weight")
row("dftft", (3, 4, 5), "DFT rule weight")
PY
