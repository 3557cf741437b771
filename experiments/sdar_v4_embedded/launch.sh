#!/usr/bin/env bash
# The v4 SDAR table on the embedded block-causal model tiny-sdar-arith (CPU, 1 thread).
set -euo pipefail
cd "$(dirname "$0")/../.."
python run.py -m experiment=sdar_v4_embedded decoder=sdar,sdar_dynamic,spiffy_sdar_dynamic eval.threads=1 "$@"
python scripts/make_tables.py --experiment sdar_v4_embedded
