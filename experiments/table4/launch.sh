#!/usr/bin/env bash
# Embedded model (CPU). For the published checkpoints on a GPU: ./launch.sh model=llada_8b_instruct task=gsm8k
set -euo pipefail
cd "$(dirname "$0")/../.."
python run.py -m experiment=table4 graph.rule=degree0,degree1,total,greedy graph.budget=3,5,8,10 "$@"
python scripts/make_tables.py --experiment table4
