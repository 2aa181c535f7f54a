#!/bin/bash
# How many named cells a new lab needs, and whether a fine-tuned site can then show it (criterion of 2026-12-06
# 10:24, analysis/training/criteria.txt). Chula held out (the leave-one-lab-out models of RULE=matched
# bench/site_finetune_ruled.sh), draws 15 and 16, K named cells a class from Chula's train split (40, then 20), the
# default calibrate-site --labelled design (--finetune 200 --diffusion-finetune 300 --ruled --clearly), scored on val
# + test; beside it each draw's verification as calibrate-site computed it before (the shipped diffusion classifier)
# and out of fold (few_shot --verify-folds). The summary judges the interval gate on both verifications, with the
# held-out draws 11-14 of bench/site_verify_folds.sh (10 a class) beside them.
# LONG=1 (criterion of 2026-12-06 11:28): the same scored runs with the fine-tunes twice as long (--finetune 400
# --diffusion-finetune 600), no verification; writes chula_long_kK_sS.json (draws 15-18 and the default design's 17-18:
# LONG=1 bench/site_named_count.sh "15 16 17 18" 40; NOVERIFY=1 bench/site_named_count.sh "17 18" 40; NOVERIFY=1:
# the scored runs only).
# Usage: [LONG=1] bench/site_named_count.sh [SEEDS] [KS] [THREADS] [DATA]   (defaults "15 16", "40 20", 1; about 25
# minutes a draw and K on one thread); "summary" prints the tables only. Writes .train/named_count/chula_{ruled,verify}_kK_sS.json.
set -euo pipefail
cd "$(dirname "$0")/.."
out=.train/named_count
mkdir -p "$out"
if [ "${1:-}" != summary ]; then
  read -r -a seeds <<< "${1:-15 16}"; read -r -a ks <<< "${2:-40 20}"
  threads=${3:-1}
  DATA=$(realpath "${4:-../shared/data}")
  for k in "${ks[@]}"; do
    for seed in "${seeds[@]}"; do
      common=(--lab chula --reference .train/ms/ref_no_chula_base_s2.safetensors --pack .train/ms/pack_no_chula.safetensors
              --diffusion .train/lolo_recipe/no_chula_measure/w --seed "$seed" --k "$k" --data "$DATA"
              --threads "$threads" --clearly)
      if [ -n "${LONG:-}" ]; then
        [ -f "$out/chula_long_k${k}_s$seed.json" ] || .venv/bin/python -m analysis.training.few_shot "${common[@]}" \
            --finetune 400 --diffusion-finetune 600 --ruled --out "$out/chula_long_k${k}_s$seed.json"
        continue
      fi
      common+=(--finetune 200 --diffusion-finetune 300)
      [ -f "$out/chula_ruled_k${k}_s$seed.json" ] || .venv/bin/python -m analysis.training.few_shot "${common[@]}" \
          --ruled --out "$out/chula_ruled_k${k}_s$seed.json"
      [ -n "${NOVERIFY:-}" ] || [ -f "$out/chula_verify_k${k}_s$seed.json" ] || .venv/bin/python -m analysis.training.few_shot "${common[@]}" \
          --verify-folds --out "$out/chula_verify_k${k}_s$seed.json"
    done
  done
fi
.venv/bin/python - "$out" <<'PY'
import glob, json, re, sys
from pathlib import Path
from analysis.site_adapt import VERIFIED_MINIMUM as M
rows = []
for f in sorted(glob.glob(".train/verify_folds/*_s*.json")):  # draws 11-14, 10 a class (07:51)
    v = json.loads(Path(f).read_text())
    if Path(f).stem.startswith("known_") or not v["finetuned"]:
        continue
    scored = sorted(glob.glob(f".train/matched*/{v['lab']}_ruled_s{v['seed']}.json"))
    if scored:
        s = json.loads(Path(scored[0]).read_text())["site network"]["k=10"]["reported"]["DFT always rule weight"]
        rows.append((v["lab"], v["seed"], 10, v["verified"], v["verified_out_of_fold"], s["balanced_accuracy"]))
for f in sorted(glob.glob(f"{sys.argv[1]}/chula_verify_k*_s*.json")):
    k, seed = map(int, re.search(r"_k(\d+)_s(\d+)", f).groups())
    v = json.loads(Path(f).read_text())
    scored = Path(f.replace("_verify_", "_ruled_"))
    if not v["finetuned"] or not scored.exists():
        continue
    s = json.loads(scored.read_text())["site network"][f"k={k}"]["reported"]["DFT always rule weight"]
    rows.append(("chula", seed, k, v["verified"], v["verified_out_of_fold"], s["balanced_accuracy"]))
print("lab draw k | verified now (interval) | out of fold (interval) | scored val+test | inside now / out of fold")
passes = {"now": [0, 0], "oof": [0, 0]}  # false, true
for lab, seed, k, now, oof, scored in rows:
    inside = {n: v["low"] >= M for n, v in (("now", now), ("oof", oof))}
    for n in inside:
        if inside[n]:
            passes[n][0 if scored < M else 1] += 1
    print(f"{lab} {seed} {k} | {now['balanced_accuracy']:.3f} ({now['low']:.1%}-{now['high']:.1%}) | "
          f"{oof['balanced_accuracy']:.3f} ({oof['low']:.1%}-{oof['high']:.1%}) | {scored:.3f} | "
          f"{'inside' if inside['now'] else 'outside'} / {'inside' if inside['oof'] else 'outside'}")
for n, (false, true) in passes.items():
    print(f"{n}: false passes (inside, scored below {M:.2f}) {false}; true passes (inside, scored {M:.2f} or more) {true}")
long = sorted(glob.glob(f"{sys.argv[1]}/chula_long_k*_s*.json"))
if long:  # criterion of 11:28: the fine-tunes twice as long against the default, the same draws
    print("\nlab draw k | reported class, default / long | site threshold: flagged, error among not flagged (default / long)")
    gains = []
    for f in long:
        k, seed = map(int, re.search(r"_k(\d+)_s(\d+)", f).groups())
        base = Path(f.replace("_long_", "_ruled_"))
        if not base.exists():
            continue
        row = lambda path, name: json.loads(path.read_text())["site network"][f"k={k}"]["reported"][name]
        d, g = (row(x, "DFT always rule weight")["balanced_accuracy"] for x in (base, Path(f)))
        dm, gm = (row(x, "DFT always matched threshold") for x in (base, Path(f)))
        gains.append(g - d)
        print(f"chula {seed} {k} | {d:.3f} / {g:.3f} ({g - d:+.3f}) | {dm['flagged_uncertain']:.1%}, "
              f"{dm['error_among_not_flagged']:.1%} / {gm['flagged_uncertain']:.1%}, {gm['error_among_not_flagged']:.1%}")
    if gains:
        print(f"mean change {sum(gains) / len(gains):+.3f} over {len(gains)} draws; largest fall {min(gains):+.3f}")
PY
