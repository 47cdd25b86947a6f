#!/usr/bin/env bash
# The main job: set up the environment, generate DigitScapes, train the softmax DeepLabV3+ baseline and
# GMMSeg DeepLabV3+ (same backbone, decoder and schedule; only the head differs) on CPU, and evaluate both
# on digitscapes_val (mIoU, ECE) and digitscapes_anomaly_val (AUROC / AP / FPR95: GMMSeg's own score, and
# the softmax model's five post-hoc scores, Mahalanobis statistics fitted on the training set).
# A model already trained in its OUTPUT_DIR is evaluated, not re-trained. Extra arguments are config
# overrides for both trainings (e.g. SOLVER.MAX_ITER 300); with overrides, both models are re-trained.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

python3 tools/install.py
job_start=$(date +%s)
PY="${GMMSEG_VENV:-.venv}/bin/python"
export DETECTRON2_DATASETS="${DETECTRON2_DATASETS:-datasets}"

"$PY" datasets/prepare_digitscapes.py --root "$DETECTRON2_DATASETS"

softmax_cfg=configs/digitscapes/deeplabv3plus_R18_softmax.yaml
softmax=output/digitscapes/deeplabv3plus_R18_softmax
gmmseg_cfg=configs/digitscapes/deeplabv3plus_R18_gmmseg.yaml
gmmseg=output/digitscapes/deeplabv3plus_R18_gmmseg

reuse() {  # reuse OUTPUT_DIR: true if a final model exists there and no overrides were given
  if [ -f "$1/model_final.pth" ] && [ "$NUM_OVERRIDES" -eq 0 ]; then
    echo "[main] reusing $1/model_final.pth (delete it to re-train)"
    return 0
  fi
  return 1
}
NUM_OVERRIDES=$#

if ! reuse "$softmax"; then  # evaluated once, below, with its Mahalanobis statistics
  "$PY" train_net.py --config-file "$softmax_cfg" OUTPUT_DIR "$softmax" DATASETS.TEST "()" "$@"
  rm -f "$softmax/mahalanobis.pth"
fi
if [ ! -f "$softmax/mahalanobis.pth" ]; then
  "$PY" tools/fit_mahalanobis.py --config-file "$softmax_cfg" --output "$softmax/mahalanobis.pth" \
    MODEL.WEIGHTS "$softmax/model_final.pth" "$@"
fi
"$PY" train_net.py --config-file "$softmax_cfg" --eval-only MODEL.WEIGHTS "$softmax/model_final.pth" \
  OUTPUT_DIR "$softmax" TEST.MAHALANOBIS_STATS "$softmax/mahalanobis.pth" "$@"

if reuse "$gmmseg"; then
  "$PY" train_net.py --config-file "$gmmseg_cfg" --eval-only MODEL.WEIGHTS "$gmmseg/model_final.pth" \
    OUTPUT_DIR "$gmmseg" "$@"
else
  "$PY" train_net.py --config-file "$gmmseg_cfg" OUTPUT_DIR "$gmmseg" "$@"
fi

echo
"$PY" tools/summarize.py "$softmax" "$gmmseg"
echo "[main] done in $(( $(date +%s) - start )) s ($(( $(date +%s) - job_start )) s after the set-up)"
