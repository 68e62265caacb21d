#!/usr/bin/env bash
# Real-data experiments on MSD hippocampus (../shared/data/msd_hippocampus_mri, 200 cases), fold 0, CPU budget.
#   (a) nnharmony's per-dataset paradigm (nnharmony_train -tr nnUNetTrainer) vs plain nnUNetv2_train, same budget
#   (b) hippocampus inside a collection with the synthetic members: joint paradigms at the same budget
#   (c) in-context: UniverSeg trained without hippocampus, segmenting it from 1-16 support cases
# Usage: [EXPERIMENTS="a b c"] [DEVICE=cpu] bash benchmarks/real_data/hippocampus.sh [WORKDIR] [EPOCHS] [ITERATIONS]
# Prints Markdown tables; logs in WORKDIR.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
DATA="${NNHARMONY_SHARED_DATA:-$HERE/../../../shared/data}/msd_hippocampus_mri"
WORK="${1:-/tmp/nnharmony_real}"; EPOCHS="${2:-4}"; ITERS="${3:-15}"; VAL_ITERS=$(( ITERS / 5 > 0 ? ITERS / 5 : 1 ))
DEVICE="${DEVICE:-cpu}"; EXPERIMENTS="${EXPERIMENTS:-a b c}"
UNIVERSEG_MINUTES="${UNIVERSEG_MINUTES:-5}"
export nnUNet_raw="$WORK/nnUNet_raw" nnUNet_preprocessed="$WORK/nnUNet_preprocessed" nnUNet_results="$WORK/nnUNet_results"
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
STEP() { echo "[$(date +%T)] $*" >&2; }
want() { [[ " $EXPERIMENTS " == *" $1 "* ]]; }

[ -d "$nnUNet_raw/Dataset910_Hippocampus" ] || nnharmony_convert nnunet -i "$DATA" -d 910 -n Hippocampus -m T1 >&2

if want a; then
  [ -d "$nnUNet_preprocessed/Collection910_Hippocampus" ] || \
    nnharmony_plan_and_preprocess -d 910 -n Collection910_Hippocampus -c 3d_fullres -np 2 >&2
  STEP "(a1) nnharmony_train -tr nnUNetTrainer (per-dataset paradigm), ${EPOCHS}x${ITERS}"
  /usr/bin/time -f "%e s wall, %M KB peak" nnharmony_train Collection910_Hippocampus 3d_fullres 0 -tr nnUNetTrainer \
    -device "$DEVICE" --epochs "$EPOCHS" --iterations-per-epoch "$ITERS" --val-iterations-per-epoch "$VAL_ITERS" \
    > "$WORK/a1.log" 2>&1
  STEP "(a2) nnUNetv2_train -tr nnUNetTrainer_Budget, ${EPOCHS}x${ITERS}"
  BUDGET_EPOCHS=$EPOCHS BUDGET_ITERATIONS=$ITERS BUDGET_VAL_ITERATIONS=$VAL_ITERS nnUNet_extTrainer="$HERE" \
    /usr/bin/time -f "%e s wall, %M KB peak" nnUNetv2_train 910 3d_fullres 0 -tr nnUNetTrainer_Budget -device "$DEVICE" \
    > "$WORK/a2.log" 2>&1
  python - "$WORK" <<'PY'
import json, sys
from pathlib import Path
work = Path(sys.argv[1]) / "nnUNet_results" / "Dataset910_Hippocampus"
print("| run | anterior Dice | posterior Dice | mean Dice |\n|---|---:|---:|---:|")
for name, trainer in [("(a1) nnharmony_train -tr nnUNetTrainer", "nnUNetTrainer"),
                      ("(a2) nnUNetv2_train -tr nnUNetTrainer_Budget", "nnUNetTrainer_Budget")]:
    s = json.loads((work / f"{trainer}__nnUNetPlans__3d_fullres/fold_0/validation/summary.json").read_text())
    m = s["mean"]
    print(f"| {name} | {m['1']['Dice']:.4f} | {m['2']['Dice']:.4f} | {s['foreground_mean']['Dice']:.4f} |")
PY
fi

if want b; then
  [ -d "$nnUNet_raw/Dataset901_SynthCT" ] || nnharmony_make_synthetic >&2
  STEP "(b) joint paradigms on 901 902 903 910, ${EPOCHS}x${ITERS}"
  nnharmony_benchmark -d 901 902 903 910 -c Collection911_SynthHippo --methods joint uharmony hermes \
    --budget "${EPOCHS}x${ITERS}" --device "$DEVICE" -o "$WORK/joint_report" --no-progress > "$WORK/b.log" 2>&1
  cat "$WORK/joint_report/results.md"
fi

if want c; then
  STEP "(c) UniverSeg with hippocampus held out, ${UNIVERSEG_MINUTES} min per model"
  python "$HERE/../universeg_support_size.py" --extra-dataset "$DATA" --workdir "$WORK/in_context" --members 3 \
    --budget-minutes "$UNIVERSEG_MINUTES" --iterations-per-epoch 10 -device "$DEVICE" --repeats 1 --ensemble 3 \
    --max-queries 20 --universeg-options "${UNIVERSEG_OPTIONS:-{\"image_size\": 64, \"encoder_blocks\": [32, 32, 32, 32]}}" \
    2> "$WORK/c.log"
fi
