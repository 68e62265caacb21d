#!/usr/bin/env bash
# Real-data experiments on MSD hippocampus (../shared/data/msd_hippocampus_mri, 200 cases), fold 0, CPU budget.
#   (a) nnharmony's per-dataset paradigm (nnharmony_train -tr nnUNetTrainer) vs plain nnUNetv2_train, same budget
#   (b) hippocampus inside a collection with the synthetic members: joint paradigms at the same budget
#   (c) in-context: UniverSeg trained without hippocampus, segmenting it from 1-16 support cases
# Usage: [EXPERIMENTS="a b c"] [DEVICE=cpu] [BATCH=2] [METHODS="nnHarmonyTrainer HermesTrainer UHarmonyTrainer"]
#        bash benchmarks/real_data/hippocampus.sh [WORKDIR] [EPOCHS] [ITERATIONS]
# (a) and (b) train on plans variants with batch size BATCH (plans_variant.py; BATCH=0 keeps the planned batch).
# SEED=N: (a) runs both sides with nnUNetTrainer_Budget seeded with N and augmentation in-process
#   (nnUNet_n_proc_DA=0), results under WORKDIR/seeded_a1 and seeded_a2: the same randomness on both sides.
# Prints Markdown tables; logs in WORKDIR.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
DATA="${NNHARMONY_SHARED_DATA:-$HERE/../../../shared/data}/msd_hippocampus_mri"
WORK="${1:-/tmp/nnharmony_real}"; EPOCHS="${2:-12}"; ITERS="${3:-50}"; VAL_ITERS=$(( ITERS / 5 > 0 ? ITERS / 5 : 1 ))
DEVICE="${DEVICE:-cpu}"; EXPERIMENTS="${EXPERIMENTS:-a b c}"; BATCH="${BATCH:-2}"
METHODS="${METHODS:-nnHarmonyTrainer HermesTrainer UHarmonyTrainer}"
UNIVERSEG_MINUTES="${UNIVERSEG_MINUTES:-5}"
export nnUNet_raw="$WORK/nnUNet_raw" nnUNet_preprocessed="$WORK/nnUNet_preprocessed" nnUNet_results="$WORK/nnUNet_results"
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
STEP() { echo "[$(date +%T)] $*" >&2; }
want() { [[ " $EXPERIMENTS " == *" $1 "* ]]; }
MEMBER_PLANS=nnUNetPlans; JOINT_PLANS=nnHarmonyPlans
if [ "$BATCH" != 0 ]; then MEMBER_PLANS=nnUNetPlans_bs$BATCH; JOINT_PLANS=nnHarmonyPlans_bs$BATCH; fi
variant() { [ "$BATCH" = 0 ] || python "$HERE/plans_variant.py" "$BATCH" 3d_fullres "$@" >&2; }
TIMED() { /usr/bin/time -f "%e s wall, %M KB peak" "$@"; }
summary() {  # summary.json -> "| anterior | posterior | mean |" of hippocampus labels 1 and 2
  python -c 'import json, sys; m = json.load(open(sys.argv[1]))["mean"]; a, p = m["1"]["Dice"], m["2"]["Dice"]
print("| %.4f | %.4f | %.4f |" % (a, p, (a + p) / 2))' "$1"
}

[ -d "$nnUNet_raw/Dataset910_Hippocampus" ] || nnharmony_convert nnunet -i "$DATA" -d 910 -n Hippocampus -m T1 >&2

if want a; then
  [ -d "$nnUNet_preprocessed/Collection910_Hippocampus" ] || \
    nnharmony_plan_and_preprocess -d 910 -n Collection910_Hippocampus -c 3d_fullres -np 2 >&2
  variant Dataset910_Hippocampus Collection910_Hippocampus
  A_ENV=(BUDGET_EPOCHS="$EPOCHS" BUDGET_ITERATIONS="$ITERS" BUDGET_VAL_ITERATIONS="$VAL_ITERS" nnUNet_extTrainer="$HERE")
  A1_TRAINER=nnUNetTrainer; A1_RESULTS=$nnUNet_results; A2_RESULTS=$nnUNet_results; SUFFIX=""
  if [ -n "${SEED:-}" ]; then  # nnharmony_train finds nnUNetTrainer_Budget through nnUNet_extTrainer, as nnU-Net does
    A_ENV+=(BUDGET_SEED="$SEED" nnUNet_n_proc_DA=0)
    A1_TRAINER=nnUNetTrainer_Budget; A1_RESULTS=$WORK/seeded_a1; A2_RESULTS=$WORK/seeded_a2; SUFFIX=", seed $SEED"
  fi
  STEP "(a1) nnharmony_train -tr $A1_TRAINER (per-dataset paradigm), ${EPOCHS}x${ITERS}, plans $JOINT_PLANS$SUFFIX"
  TIMED env "${A_ENV[@]}" nnUNet_results="$A1_RESULTS" nnharmony_train Collection910_Hippocampus 3d_fullres 0 -p "$JOINT_PLANS" \
    -tr "$A1_TRAINER" -device "$DEVICE" --epochs "$EPOCHS" --iterations-per-epoch "$ITERS" \
    --val-iterations-per-epoch "$VAL_ITERS" > "$WORK/a1${SEED:+_seed$SEED}.log" 2>&1
  STEP "(a2) nnUNetv2_train -tr nnUNetTrainer_Budget, ${EPOCHS}x${ITERS}, plans $MEMBER_PLANS$SUFFIX"
  TIMED env "${A_ENV[@]}" nnUNet_results="$A2_RESULTS" nnUNetv2_train 910 3d_fullres 0 -p "$MEMBER_PLANS" -tr nnUNetTrainer_Budget \
    -device "$DEVICE" > "$WORK/a2${SEED:+_seed$SEED}.log" 2>&1
  V="Dataset910_Hippocampus/%s__${MEMBER_PLANS}__3d_fullres/fold_0/validation/summary.json"
  echo "| run | anterior Dice | posterior Dice | mean Dice |"; echo "|---|---:|---:|---:|"
  echo "| (a1) nnharmony_train -tr $A1_TRAINER$SUFFIX $(summary "$A1_RESULTS/$(printf "$V" "$A1_TRAINER")")"
  echo "| (a2) nnUNetv2_train -tr nnUNetTrainer_Budget$SUFFIX $(summary "$A2_RESULTS/$(printf "$V" nnUNetTrainer_Budget)")"
fi

if want b; then
  [ -d "$nnUNet_raw/Dataset901_SynthCT" ] || nnharmony_make_synthetic >&2
  [ -d "$nnUNet_preprocessed/Collection911_SynthHippo" ] || \
    nnharmony_plan_and_preprocess -d 901 902 903 910 -n Collection911_SynthHippo -c 3d_fullres -np 2 >&2
  variant Collection911_SynthHippo
  echo "| (b) joint trainer on 901 902 903 910 | anterior Dice | posterior Dice | mean Dice |"; echo "|---|---:|---:|---:|"
  for tr in $METHODS; do
    STEP "(b) nnharmony_train -tr $tr on 901 902 903 910, ${EPOCHS}x${ITERS}, plans $JOINT_PLANS"
    TIMED nnharmony_train Collection911_SynthHippo 3d_fullres 0 -p "$JOINT_PLANS" -tr "$tr" -device "$DEVICE" \
      --epochs "$EPOCHS" --iterations-per-epoch "$ITERS" --val-iterations-per-epoch "$VAL_ITERS" > "$WORK/b_$tr.log" 2>&1
    echo "| $tr $(summary "$nnUNet_results/Collection911_SynthHippo/${tr}__${JOINT_PLANS}__3d_fullres/fold_0/validation/Dataset910_Hippocampus/summary.json")"
  done
fi

if want c; then
  STEP "(c) UniverSeg with hippocampus held out, ${UNIVERSEG_MINUTES} min per model"
  python "$HERE/../universeg_support_size.py" --extra-dataset "$DATA" --workdir "$WORK/in_context" --members 3 \
    --budget-minutes "$UNIVERSEG_MINUTES" --iterations-per-epoch 10 -device "$DEVICE" --repeats 1 --ensemble 3 \
    --max-queries 20 --universeg-options "${UNIVERSEG_OPTIONS:-{\"image_size\": 64, \"encoder_blocks\": [32, 32, 32, 32]}}" \
    2> "$WORK/c.log"
fi
