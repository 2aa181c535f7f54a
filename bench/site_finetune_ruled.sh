#!/bin/bash
# DFT+FT RULED (criterion of 2026-12-06 02:09, analysis/training/criteria.txt): both site fine-tunes,
# only where the shipped models read the named cells below the validated level (site_adapt.finetune_rule).
#   held-out LAB (chula or bccd): the leave-one-lab-out models, 10 named cells a class from LAB's train
#     split, new draws 6-8, scored on its val + test beside the shipped design on the same draws;
#     candidate A ("DFT rule weight": DFT where the gate opens) and B ("DFT always rule weight").
#   known LAB (pbc, bccd or chula; "known:LAB"): the shipped weights, 10 named cells a class from
#     LAB's val split (seeds 0, 1), the rest of val + test unlabelled, scored on test (48 a class).
# With RULE=clearly (criterion of 2026-12-06 03:35): the rule asks the whole 95 % interval of the shipped
# models' reading to lie below the validated level (few_shot --clearly); new draws 9, 10 (held out) and 2
# (known); writes .train/ruled_clearly/. With RULE=matched (criterion of the seventeenth session): the
# stricter rule, and a fine-tuned site's own uncertainty threshold (site_adapt.matched_threshold, the row
# "C: B, site threshold"); new draws 11, 12 (held out) and 3 (known); writes .train/matched/.
# DRAWS="13 14" OUT=.train/matched2 runs other draws into another folder (the seventeenth session's
# confirmation after the switch).
# Usage: [RULE=clearly] bench/site_finetune_ruled.sh LAB|known:LAB [THREADS] [DATA]; held-out about 45
# minutes a lab on one thread (bench/lolo_shipped_measure.sh LAB first), a known lab 2-15 minutes a draw.
# Writes .train/ruled/ and prints each lab's table.
set -euo pipefail
cd "$(dirname "$0")/.."
arg=${1:?LAB or known:LAB}
threads=${2:-1}
DATA=$(realpath "${3:-../shared/data}")
steps=(--finetune 200 --diffusion-finetune 300 --ruled)
dir=.train/ruled held=(6 7 8) known=(0 1)
if [ "${RULE:-}" = clearly ]; then
  steps+=(--clearly) dir=.train/ruled_clearly held=(9 10) known=(2)
elif [ "${RULE:-}" = matched ]; then
  steps+=(--clearly) dir=.train/matched held=(11 12) known=(3)
fi
if [ -n "${DRAWS:-}" ]; then  # other draws (e.g. DRAWS="13 14" OUT=.train/matched2: the confirmation)
  read -r -a held <<< "$DRAWS"; known=("${held[@]}") dir=${OUT:?OUT names the folder for other draws}
fi
mkdir -p "$dir"
run() {  # out options...
  local out=$1; shift
  [ -f "$out" ] || .venv/bin/python -m analysis.training.few_shot --data "$DATA" --threads "$threads" \
      "$@" --out "$out"
}
if [[ $arg == known:* ]]; then
  lab=${arg#known:}
  common=(--lab "$lab" --reference analysis/weights/reference_effnet.safetensors
          --pack analysis/weights/site_source.safetensors --diffusion analysis/weights --named-split val
          --score-splits test --adapt-splits val+test --per-class 48)
  files=""
  for seed in "${known[@]}"; do
    run "$dir/known_${lab}_shipped_s$seed.json" "${common[@]}" --seed "$seed"
    run "$dir/known_${lab}_ruled_s$seed.json" "${common[@]}" --seed "$seed" "${steps[@]}"
    files+=" $dir/known_${lab}_shipped_s$seed.json $dir/known_${lab}_ruled_s$seed.json"
  done
else
  lab=$arg
  bench/lolo_shipped_measure.sh "$lab" "$threads" "$DATA" > /dev/null
  measure=.train/lolo_recipe/no_${lab}_measure
  reference=.train/ms/ref_no_${lab}_base_s2.safetensors
  [ -f "$reference" ] || reference=analysis/weights/training/lolo_recipe_no_$lab/reference_effnet.safetensors
  common=(--lab "$lab" --reference "$reference" --pack ".train/ms/pack_no_$lab.safetensors" --diffusion "$measure/w")
  for seed in "${held[@]}"; do
    run "$dir/${lab}_shipped_s$seed.json" "${common[@]}" --seed "$seed"
    run "$dir/${lab}_ruled_s$seed.json" "${common[@]}" --seed "$seed" "${steps[@]}"
  done
  files=""
  for seed in "${held[@]}"; do files+=" $dir/${lab}_shipped_s$seed.json $dir/${lab}_ruled_s$seed.json"; done
fi
# shellcheck disable=SC2086  # the file names hold no spaces
.venv/bin/python - $files <<'PY'
import json, sys
runs = [json.load(open(f)) for f in sys.argv[1:]]
def summary(name, rows):
    bal = [r["balanced_accuracy"] for r in rows]
    four = [sum(v for c, v in r["recall"].items() if c != "basophil") / max(1, len(r["recall"]) - 1)
            for r in rows]
    err = [r["error_among_not_flagged"] for r in rows]
    flag = [r["flagged_uncertain"] for r in rows]
    m = lambda v: sum(v) / len(v)
    print(f"  {name:22s} " + " ".join(f"{v:.3f}" for v in bal) + f" (mean {m(bal):.3f}); without the "
          f"basophil {m(four):.3f}; flagged {m(flag):.1%}; error among not flagged {m(err):.2%}")
ruled = [r["site network"]["k=10"] for r in runs if r.get("ruled")]
print(runs[0]["lab"], "scored on", runs[0]["scored_on"], "; named from", runs[0]["named_from"])
print("  rule (shipped read the named cells):",
      ", ".join(f"{r['rule']['shipped_reads_named']:.0%} {'fine-tune' if r['rule']['finetuned'] else 'keep'}"
                for r in ruled), "; gate", "".join("o" if r["gate"]["used"] else "-" for r in ruled))
summary("shipped design", [r["site network"]["k=10"]["reported"]["R0 rule weight"]
                           for r in runs if not r.get("ruled")])
summary("A: DFT where gate opens", [r["reported"]["DFT rule weight"] for r in ruled])
summary("B: DFT always", [r["reported"]["DFT always rule weight"] for r in ruled])
if all("DFT always matched threshold" in r["reported"] for r in ruled):
    summary("C: B, site threshold", [r["reported"]["DFT always matched threshold"] for r in ruled])
    print("  site thresholds:", ", ".join(f"{r['site_threshold']['threshold']:.3f} on "
                                         f"{r['site_threshold']['on']}" if "site_threshold" in r
                                         else "the rule's (kept)" for r in ruled))
PY
