#!/usr/bin/env bash
# One command for a GPU machine (docs/numerics.md, "What is exact, where").
#
#   bash scripts/gpu_check.sh          # on a GPU image: install, CUDA test tier, 8B-shape cost curves (< 8 min, H100)
#   bash scripts/gpu_check.sh --cpu    # its CPU half (CI): the same test files, CPU parameters
#
# GPU: installs the project over the image's packages (torch, transformers, safetensors, pytest, hypothesis; no
# downloads), runs `pytest -m cuda` (exactness in float32/bfloat16, default and invariant mode; host
# synchronisations per forward; the compile path), then `scripts/bench.py --shape ... --device cuda` cost curves in
# bfloat16 at full depth and paper lengths where the image has bench.py's extra packages (pandas, matplotlib,
# lm-eval; else it says so). At most 8 small files under $OUT (default results/gpu_check): summary.md,
# cuda_tests.txt and one JSON per curve.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
TESTS="tests/models/test_numerics.py tests/decoding/test_invariant.py tests/decoding/test_device.py"
if [ "${1:-}" = "--cpu" ]; then
  set -e
  python -m pytest -q -m "not cuda and not slow" $TESTS
  exit 0
fi
OUT="${OUT:-results/gpu_check}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
start=$(date +%s)
pip install -q --no-deps --no-build-isolation -e . > /tmp/gpu_check_install.log 2>&1 || { tail -5 /tmp/gpu_check_install.log | tee "$SUMMARY"; exit 1; }
{
  echo "# gpu_check $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  python -c "import torch, transformers; print(f'torch {torch.__version__}, transformers {transformers.__version__},', torch.cuda.get_device_name(0))"
} > "$SUMMARY"
timeout 300 python -m pytest -q -p no:cacheprovider -m cuda $TESTS -o addopts="--strict-markers" > "$OUT/cuda_tests.txt" 2>&1
echo "- CUDA tests (pytest -m cuda): exit $? ($(tail -1 "$OUT/cuda_tests.txt"))" >> "$SUMMARY"
if python -c "import pandas, matplotlib, lm_eval" 2>/dev/null; then
  for spec in "llada-8b 900 256 32" "dream-7b 900 256 32" "sdar-8b 900 256 32" "llada2-mini 900 256 32"; do
    set -- $spec
    timeout 90 python scripts/bench.py --decoders --shape "$1" --device cuda --dtype bfloat16 --prompt-len "$2" \
      --gen-length "$3" --block-length "$4" --cost-curve 0 1 2 3 5 8 10 --layouts exact prefix dual \
      --repeats 3 --warmup 1 --out "$OUT" --name "curve_$1" > /dev/null 2>&1
    echo "- cost curve $1 (bfloat16, full depth): exit $?" >> "$SUMMARY"
    [ -f "$OUT/curve_$1.md" ] && cat "$OUT/curve_$1.md" >> "$SUMMARY" && rm "$OUT/curve_$1.md"  # <= 8 files
  done
else
  echo "- cost curves skipped: this image lacks scripts/bench.py's packages (pandas, matplotlib, lm-eval)" >> "$SUMMARY"
fi
echo "- wall-clock: $(( $(date +%s) - start )) s" >> "$SUMMARY"
cat "$SUMMARY"
