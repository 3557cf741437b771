#!/usr/bin/env bash
# Embedded model (CPU). For the published checkpoints on a GPU: ./launch.sh model=llada_8b_instruct task=gsm8k
set -euo pipefail
cd "$(dirname "$0")/../.."
python run.py -m experiment=table2 decoder=vanilla,spiffy,multi_token,spiffy_multi_token,kv_cache,spiffy_kv_cache "$@"
python scripts/make_tables.py --experiment table2
