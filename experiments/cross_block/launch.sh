#!/usr/bin/env bash
# Embedded model (CPU). For the published checkpoints on a GPU: ./launch.sh model=llada_8b_instruct task=gsm8k
set -euo pipefail
cd "$(dirname "$0")/../.."
python run.py -m experiment=cross_block decoder.cross_block=false,true graph.budget=3,10 graph.rule=degree1,greedy "$@"
python scripts/make_tables.py --experiment cross_block
