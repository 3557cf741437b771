#!/usr/bin/env bash
# The v4 SDAR table on the embedded block-causal model tiny-sdar-arith (CPU, 1 thread), stopping at its EOS (96).
# On a GPU: ./launch.sh model=sdar_8b_chat_b32 task=gsm8k 'decoder.stop_ids=[151643]' model.device=cuda
set -euo pipefail
cd "$(dirname "$0")/../.."
RESULTS_DIR="${RESULTS_DIR:-runs/results}" TABLES_DIR="${TABLES_DIR:-runs/tables}"
python run.py -m experiment=sdar_v4_embedded decoder=sdar,sdar_dynamic,spiffy_sdar_dynamic 'decoder.stop_ids=[96]' eval.threads=1 results_dir="$RESULTS_DIR" "$@"
python scripts/make_tables.py --experiment sdar_v4_embedded --results "$RESULTS_DIR" --out "$TABLES_DIR"
