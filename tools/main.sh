#!/usr/bin/env bash
# The main job: set up the environment, generate DigitScapes, train the softmax DeepLabV3+ baseline on
# CPU and evaluate it on digitscapes_val (mIoU, ECE). A trained model in OUTPUT_DIR is reused, not
# re-trained. Extra arguments are config overrides passed to train_net.py (e.g. SOLVER.MAX_ITER 300).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

python3 tools/install.py
PY="${GMMSEG_VENV:-.venv}/bin/python"
export DETECTRON2_DATASETS="${DETECTRON2_DATASETS:-datasets}"

"$PY" datasets/prepare_digitscapes.py --root "$DETECTRON2_DATASETS"

cfg=configs/digitscapes/deeplabv3plus_R18_softmax.yaml
out=output/digitscapes/deeplabv3plus_R18_softmax
if [ -f "$out/model_final.pth" ] && [ $# -eq 0 ]; then
  echo "[main] reusing the trained baseline $out/model_final.pth (delete it to re-train)"
  "$PY" train_net.py --config-file "$cfg" --eval-only MODEL.WEIGHTS "$out/model_final.pth" OUTPUT_DIR "$out"
else
  "$PY" train_net.py --config-file "$cfg" OUTPUT_DIR "$out" "$@"
fi

"$PY" tools/summarize.py "$out"
echo "[main] done in $(( $(date +%s) - start )) s"
