#!/bin/bash
# A fine-tuned site's verification, out of fold (criterion of 2026-12-06 07:51, analysis/training/criteria.txt):
# for each fine-tuned draw of the seventeenth session's runs at a held-out LAB (Chula draws 11-14, BCCD 12-14; the
# same leave-one-lab-out models, named cells and seeds as RULE=matched bench/site_finetune_ruled.sh), the named
# cells' verification read with the shipped diffusion classifier (as calibrate-site did) and with the fine-tuned one
# out of fold (site_adapt.out_of_fold_diffusion), each beside the site network's out-of-fold posteriors; then both
# against the balanced accuracy the site's reported class scored on LAB's val + test in those runs
# (.train/matched*/LAB_ruled_sN.json, row "DFT always rule weight"; run that script first where one is missing).
# known:LAB (criterion of 2026-12-06 08:51): the shipped weights at a lab they trained on, draws 0-3 (10 named cells a
# class from val, as bench/site_finetune_ruled.sh known:LAB), the verification calibrate-site computes; the summary then
# scores both validated-domain gates (the point figure at 85 %, and the whole 95 % interval at or above it) against each
# site's reported class scored on test (that script's runs; R0 of the shipped run where nothing is fine-tuned).
# Usage: bench/site_verify_folds.sh LAB|known:LAB [THREADS] [DATA]   (held out about 12 minutes a draw on one thread,
# known 1-3); writes .train/verify_folds/[known_]LAB_sN.json and prints the table; "summary" prints every lab's.
set -euo pipefail
cd "$(dirname "$0")/.."
out=.train/verify_folds
mkdir -p "$out"
arg=${1:?chula, bccd, known:LAB or summary}
threads=${2:-1}
DATA=$(realpath "${3:-../shared/data}")
verify() {  # out options...
  local file=$1; shift
  [ -f "$file" ] || .venv/bin/python -m analysis.training.few_shot --data "$DATA" --threads "$threads" "$@" \
      --finetune 200 --diffusion-finetune 300 --clearly --verify-folds --out "$file"
}
if [[ $arg == known:* ]]; then  # a lab the shipped models trained on (criterion of 08:51): draws 0-3, named from val
  lab=${arg#known:}
  for seed in 0 1 2 3; do
    verify "$out/known_${lab}_s$seed.json" --lab "$lab" --reference analysis/weights/reference_effnet.safetensors \
        --pack analysis/weights/site_source.safetensors --diffusion analysis/weights --named-split val \
        --adapt-splits val+test --seed "$seed"
  done
elif [ "$arg" != summary ]; then
  lab=$arg
  draws=$([ "$lab" = chula ] && echo "11 12 13 14" || echo "12 13 14")
  for seed in $draws; do
    verify "$out/${lab}_s$seed.json" --lab "$lab" --reference ".train/ms/ref_no_${lab}_base_s2.safetensors" \
        --pack ".train/ms/pack_no_$lab.safetensors" --diffusion ".train/lolo_recipe/no_${lab}_measure/w" --seed "$seed"
  done
fi
.venv/bin/python - "$out" <<'PY'
import glob, json, sys
from analysis.site_adapt import VERIFIED_MINIMUM as M  # the validated level both gates judge against
from pathlib import Path
rows, gates = [], []
def reported(pattern, row):
    f = sorted(glob.glob(pattern))
    return json.loads(Path(f[0]).read_text())["site network"]["k=10"]["reported"][row] if f else None
for f in sorted(glob.glob(f"{sys.argv[1]}/*_s*.json")):
    v = json.loads(Path(f).read_text())
    if Path(f).stem.startswith("known_"):  # scored on test; not fine-tuned: the shipped run's R0 is the site
        scored = (reported(f".train/*/known_{v['lab']}_shipped_s{v['seed']}.json", "R0 rule weight")
                  if not v["finetuned"] else reported(f".train/matched*/known_{v['lab']}_ruled_s{v['seed']}.json",
                                                     "DFT always rule weight"))
    else:
        scored = reported(f".train/matched*/{v['lab']}_ruled_s{v['seed']}.json", "DFT always rule weight")
    if scored is None:
        print(f"{Path(f).stem}: no scored run to compare with"); continue
    gates.append((Path(f).stem, v["verified"], scored["balanced_accuracy"]))
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
print("\nvalidated-domain gates (criterion of 08:51): inside by the point figure / by the whole 95 % interval")
false = {"point": [0, 0], "interval": [0, 0]}
pbc = []  # PBC's draws inside by the interval
for name, v, s in gates:
    point, whole = v["balanced_accuracy"] >= M, v["low"] >= M
    if name.startswith("known_pbc"):
        pbc.append(whole)
    for gate, inside in (("point", point), ("interval", whole)):
        false[gate][0] += inside and s < 0.80
        false[gate][1] += (not inside) and s >= 0.85
    print(f"{name:16s} verified {v['balanced_accuracy']:.3f} ({v['low']:.3f}-{v['high']:.3f})  "
          f"point {'inside ' if point else 'outside'}  interval {'inside ' if whole else 'outside'}  scored {s:.3f}")
for gate, (passes, stops) in false.items():
    print(f"{gate:8s} gate: {passes} false passes (inside, scored < 0.80), {stops} false stops (outside, scored >= 0.85)")
print(f"switch: {false['interval'][0] < false['point'][0] and bool(pbc) and all(pbc)} "
      f"(PBC inside in {sum(pbc)} of {len(pbc)} draws)")
PY
