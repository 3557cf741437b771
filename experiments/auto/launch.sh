#!/usr/bin/env bash
# Embedded model (CPU). For the published checkpoints on a GPU: ./launch.sh model=llada_8b_instruct task=gsm8k
# graph.budget=auto over the vanilla, prefix-cache, dual-cache and threshold bases (D* chosen per base and device).
set -euo pipefail
cd "$(dirname "$0")/../.."
python run.py -m experiment=auto decoder=spiffy,spiffy_kv_cache,spiffy_multi_token "$@"
python run.py -m experiment=auto decoder=spiffy decoder.cache=prefix "$@"
python scripts/make_tables.py --experiment auto
