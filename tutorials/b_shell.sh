#!/usr/bin/env bash
# Tutorial (b): the quick start from the shell, in three commands.
#
#   tutorials/b_shell.sh                          # quick (the default): minutes; 64 calibration
#                                                 # images, 20 iterations per block
#   FULL=1 tutorials/b_shell.sh                   # the published schedule (1024 images, 20000/5000
#                                                 # iterations per block): hours on a CPU
#   (IOSO_TUTORIAL_FULL=1 works too, as for the Python tutorials.)
#
# OUT (default tutorial_out/b) receives the ONNX file, the .tar, the outputs and the profile.
set -euo pipefail
OUT=${OUT:-tutorial_out/b}
mkdir -p "$OUT"
SMALL=(--num-samples 64 --iters 20 --act-iters 20)
if [[ "${FULL:-${IOSO_TUTORIAL_FULL:-0}}" == 1 ]]; then SMALL=(); fi

# 1. Calibrate the shipped float ResNet-20 with IOSO at W4A4 on the shipped calibration
#    subset of Fashion-MNIST, and export the quantized model as ONNX (docs/onnx_format.md).
ioso-calibrate --model resnet20 --pretrained --data shipped --method ioso --wbits 4 --abits 4 \
    ${SMALL[@]+"${SMALL[@]}"} -o "$OUT/resnet20_w4a4.onnx"

# 2. Compile it for the NPU with the CPU as fallback. Any NPUConfig field is a target option,
#    here the default four PE arrays spelled out.
tvmc compile "$OUT/resnet20_w4a4.onnx" --target="ioso_npu, llvm" --target-ioso_npu-pe_arrays=4 \
    --input-shapes "input:[1,1,32,32]" -o "$OUT/resnet20_w4a4.tar"

# 3. Run it on the simulator with a random input: top classes, host time, and the per-layer
#    profile (cycles, us at the configured clock, MAC utilisation, ISG groups, NPU/CPU).
tvmc run "$OUT/resnet20_w4a4.tar" --fill-mode random --print-top 3 --print-time \
    --outputs "$OUT/outputs.npz" --profile --profile-json "$OUT/profile.json" --profile-plot "$OUT/profile.png"
