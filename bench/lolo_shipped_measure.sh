#!/bin/bash
# Measure the shipped recipe without LAB (bench/lolo_shipped_recipe.sh LAB, run first) at LAB, a lab
# it never trained on (criterion of 2026-12-05 20:13, analysis/training/criteria.txt):
#   - few_shot.json per draw (seeds 0-2): the diffusion classifier alone, the reported class without
#     named cells and with 10 named cells a class (the site network), on LAB's val + test;
#   - posteriors.npz and site.json: both models on LAB's train cells, the unsure share and whether
#     calibrate-site would mark LAB as a site the node cannot read.
# Needs the seed-2 reference trained without LAB (11-14 minutes on one core):
#   python -m analysis.training.reference_train --labs pbc,bccd --seed 2 --steps 1500 --threads 1 \
#       --out .train/ms/ref_no_chula_base_s2.safetensors            (--labs pbc,chula: ref_no_bccd_base_s2)
# Where neither it nor the diffusion classifier is under .train, the committed ones of the
# fourteenth session are used (analysis/weights/training/lolo_recipe_no_LAB, README there).
# Usage: bench/lolo_shipped_measure.sh LAB [THREADS] [DATA]; writes .train/lolo_recipe/no_LAB_measure/
set -euo pipefail
cd "$(dirname "$0")/.."
lab=${1:?chula or bccd}
threads=${2:-1}
DATA=$(realpath "${3:-../shared/data}")
labs=$([ "$lab" = chula ] && echo pbc,bccd || echo pbc,chula)
src=.train/lolo_recipe/no_$lab
out=.train/lolo_recipe/no_${lab}_measure
reference=.train/ms/ref_no_${lab}_base_s2.safetensors
pack=.train/ms/pack_no_$lab.safetensors
committed=analysis/weights/training/lolo_recipe_no_$lab
diffusion=$src/stage3.safetensors
if [ ! -f "$diffusion" ] && [ ! -f "$reference" ]; then
  diffusion=$committed/cytodiffusion.safetensors reference=$committed/reference_effnet.safetensors
fi
[ -f "$diffusion" ] || { echo "run bench/lolo_shipped_recipe.sh $lab first" >&2; exit 2; }
[ -f "$reference" ] || { echo "$reference is missing (its command: this script's header)" >&2; exit 2; }
mkdir -p "$out" "$(dirname "$pack")"
[ -f "$pack" ] || .venv/bin/python -m analysis.training.site_pack --data "$DATA" --labs "$labs" --out "$pack"
[ -f "$out/w/calibration.json" ] || bench/lolo_weights_folder.sh "$lab" "$reference" "$diffusion" "$out" "$DATA"
for seed in 0 1 2; do
  [ -f "$out/few_shot_s$seed.json" ] || .venv/bin/python -m analysis.training.few_shot --data "$DATA" \
      --lab "$lab" --reference "$reference" --pack "$pack" --diffusion "$out/w" --seed "$seed" \
      --threads "$threads" --out "$out/few_shot_s$seed.json"
done
[ -f "$out/posteriors.npz" ] || .venv/bin/python -m analysis.training.site_readable posteriors \
    --data "$DATA" --lab "$lab" --weights "$out/w" --out "$out/posteriors.npz" --threads "$threads"
.venv/bin/python -m analysis.training.site_readable held-out --held-out "$out/posteriors.npz" \
    --out "$out/site.json"
# The table of the model card: balanced accuracy on LAB's val + test, per draw and their mean.
.venv/bin/python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = ["diffusion alone", "shipped network, rule weight", "R0 rule weight", "R1 site network alone"]
runs = [json.loads((out / f"few_shot_s{s}.json").read_text()) for s in (0, 1, 2)]
print(f"{runs[0]['scored_on']}, {runs[0]['cells']} cells; draws 0, 1, 2 and mean")
for name in rows:
    values = [r["site network"]["k=10"]["reported"][name]["balanced_accuracy"] for r in runs]
    print(f"  {name:30s} " + "  ".join(f"{v:.3f}" for v in values) + f"  mean {sum(values) / 3:.3f}")
r0 = [r["site network"]["k=10"]["reported"]["R0 rule weight"] for r in runs]
print("  R0 flagged uncertain " + ", ".join(f"{x['flagged_uncertain']:.3f}" for x in r0)
      + "; error among not flagged " + ", ".join(f"{x['error_among_not_flagged']}" for x in r0))
print("  gate opened: " + ", ".join(str(r["site network"]["k=10"]["gate"]["used"]) for r in runs))
site = json.loads((out / "site.json").read_text())
for name, case in site["sites"].items():
    print(f"  as a site ({name}): {case['unsure']} of {case['cells']} unsure ({case['share']:.1%}), "
          f"p {case['p']}, marked {case['marked']}, reported {case['reported_balanced_accuracy']}")
PY
