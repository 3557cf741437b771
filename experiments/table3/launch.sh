#!/usr/bin/env bash
# Embedded model (CPU). For the published checkpoints on a GPU: ./launch.sh model=llada_8b_instruct task=gsm8k
set -euo pipefail
cd "$(dirname "$0")/../.."
python run.py -m experiment=table3 decoder=spiffy,spiffy_kv_cache,spiffy_multi_token graph.budget=3,10 "$@"
python scripts/make_tables.py --experiment table3
