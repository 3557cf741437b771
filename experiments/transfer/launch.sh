#!/usr/bin/env bash
# Embedded model (CPU). For the published checkpoints on a GPU: ./launch.sh model=llada_8b_instruct task=gsm8k
set -euo pipefail
cd "$(dirname "$0")/../.."
python run.py -m experiment=transfer task.calibration_task=arith,gsm8k "$@"
python scripts/make_tables.py --experiment transfer
