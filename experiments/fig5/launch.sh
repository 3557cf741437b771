#!/usr/bin/env bash
# Embedded model (CPU). For the published checkpoints on a GPU: ./launch.sh model=llada_8b_instruct task=gsm8k,
# with the cost curve measured there: BENCH_ARGS="--model <path> --device cuda --dtype bfloat16" NAME=fig5_gpu.
set -euo pipefail
cd "$(dirname "$0")/../.."
NAME="${NAME:-fig5_cpu}"
python run.py -m experiment=fig5 decoder=spiffy,spiffy_kv_cache graph.budget=0,1,2,3,5,8,10,16 "$@"
# shellcheck disable=SC2086
python scripts/bench.py --decoders --name "$NAME" --cost-curve 0 1 2 3 5 8 10 16 ${BENCH_ARGS:-}
python scripts/make_tables.py --experiment fig5 --cost-curve "results/bench/$NAME.json"
