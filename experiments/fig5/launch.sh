#!/usr/bin/env bash
# Embedded model (CPU). For the published checkpoints on a GPU: ./launch.sh model=llada_8b_instruct task=gsm8k,
# with the cost curve measured there: BENCH_ARGS="--model <path> --device cuda --dtype bfloat16" NAME=fig5_gpu.
set -euo pipefail
cd "$(dirname "$0")/../.."
# Rows go to $RESULTS_DIR (default runs/results, untracked), graphs to $GRAPH_ROOT (runs/graphs), tables to
# $TABLES_DIR (runs/tables); scripts/reproduce_results.sh points them at results/ to regenerate the committed files.
RESULTS_DIR="${RESULTS_DIR:-runs/results}" GRAPH_ROOT="${GRAPH_ROOT:-runs/graphs}" TABLES_DIR="${TABLES_DIR:-runs/tables}"
NAME="${NAME:-fig5_cpu}"
python run.py -m experiment=fig5 decoder=spiffy,spiffy_kv_cache graph.budget=0,1,2,3,5,8,10,16 results_dir="$RESULTS_DIR" graph.root="$GRAPH_ROOT" "$@"
# shellcheck disable=SC2086
python scripts/bench.py --decoders --name "$NAME" --out "${BENCH_DIR:-runs/bench}" --cost-curve 0 1 2 3 5 8 10 16 ${BENCH_ARGS:-}
python scripts/make_tables.py --experiment fig5 --results "$RESULTS_DIR" --out "$TABLES_DIR" --cost-curve "${BENCH_DIR:-runs/bench}/$NAME.json"
