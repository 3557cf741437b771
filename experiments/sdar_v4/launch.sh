#!/usr/bin/env bash
# Tiny random SDAR model (CPU). For the published checkpoint on a GPU: ./launch.sh model=sdar_8b_chat_b32 task=gsm8k
set -euo pipefail
cd "$(dirname "$0")/../.."
RESULTS_DIR="${RESULTS_DIR:-runs/results}" TABLES_DIR="${TABLES_DIR:-runs/tables}"
python run.py -m experiment=sdar_v4 decoder=sdar,sdar_dynamic,spiffy_sdar_dynamic results_dir="$RESULTS_DIR" "$@"
python scripts/make_tables.py --experiment sdar_v4 --results "$RESULTS_DIR" --out "$TABLES_DIR"
