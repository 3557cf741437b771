#!/usr/bin/env bash
# Embedded model (CPU). For the published checkpoints on a GPU: ./launch.sh model=llada_8b_instruct task=gsm8k
# graph.budget=auto over the vanilla, prefix-cache, dual-cache and threshold bases (D* chosen per base and device).
set -euo pipefail
cd "$(dirname "$0")/../.."
# Rows go to $RESULTS_DIR (default runs/results, untracked), graphs to $GRAPH_ROOT (runs/graphs), tables to
# $TABLES_DIR (runs/tables); scripts/reproduce_results.sh points them at results/ to regenerate the committed files.
RESULTS_DIR="${RESULTS_DIR:-runs/results}" GRAPH_ROOT="${GRAPH_ROOT:-runs/graphs}" TABLES_DIR="${TABLES_DIR:-runs/tables}"
python run.py -m experiment=auto decoder=spiffy,spiffy_kv_cache,spiffy_multi_token results_dir="$RESULTS_DIR" graph.root="$GRAPH_ROOT" "$@"
python run.py -m experiment=auto decoder=spiffy decoder.cache=prefix results_dir="$RESULTS_DIR" graph.root="$GRAPH_ROOT" "$@"
python scripts/make_tables.py --experiment auto --results "$RESULTS_DIR" --out "$TABLES_DIR"
