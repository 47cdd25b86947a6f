#!/usr/bin/env bash
# The main job: set up the environment, generate DigitScapes, train the softmax DeepLabV3+ baseline and
# GMMSeg DeepLabV3+ (same backbone, decoder and schedule; only the head differs) on CPU, and evaluate both
# on digitscapes_val (mIoU, ECE). A model already trained in its OUTPUT_DIR is evaluated, not re-trained.
# Extra arguments are config overrides for both runs (e.g. SOLVER.MAX_ITER 300); with overrides, both
# models are re-trained.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

python3 tools/install.py
PY="${GMMSEG_VENV:-.venv}/bin/python"
export DETECTRON2_DATASETS="${DETECTRON2_DATASETS:-datasets}"

"$PY" datasets/prepare_digitscapes.py --root "$DETECTRON2_DATASETS"

run() {  # run CONFIG OUTPUT_DIR [overrides...]
  local cfg=$1 out=$2
  shift 2
  if [ -f "$out/model_final.pth" ] && [ $# -eq 0 ]; then
    echo "[main] reusing $out/model_final.pth (delete it to re-train)"
    "$PY" train_net.py --config-file "$cfg" --eval-only MODEL.WEIGHTS "$out/model_final.pth" OUTPUT_DIR "$out"
  else
    "$PY" train_net.py --config-file "$cfg" OUTPUT_DIR "$out" "$@"
  fi
}

softmax=output/digitscapes/deeplabv3plus_R18_softmax
gmmseg=output/digitscapes/deeplabv3plus_R18_gmmseg
run configs/digitscapes/deeplabv3plus_R18_softmax.yaml "$softmax" "$@"
run configs/digitscapes/deeplabv3plus_R18_gmmseg.yaml "$gmmseg" "$@"

echo
"$PY" tools/summarize.py "$softmax" "$gmmseg"
echo "[main] done in $(( $(date +%s) - start )) s"
