#!/usr/bin/env bash
# Regenerate every committed number of the README and the model card on this machine (CPU, ~30 min).
# Each line is independent; results land in results/ and spiffy/checkpoints/tiny-llada-arith/.
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1
# model card: accuracy and confidence of the embedded model (vanilla, T=0, 200 held-out problems)
python scripts/eval_embedded.py --n 200 --json results/embedded_eval.json
# calibrated graphs committed for the embedded model (1 token/step, task settings), D in {3,5,8,10}
python scripts/calibrate.py --budgets 3 5 8 10 --rules degree1 greedy --n 20
# Tables 1/4, sample efficiency, transfer, Spiffy over each base (exact NFE on 200 held-out problems)
python scripts/calibration_study.py --n-test 200
# noise-aware drafting: acceptance vs temperature (SPEC 5.7)
python scripts/temperature_study.py --n-test 100 --measure 20
# wall-clock, side by side in one process: chain/fig2 graphs in exact and shared layouts
python scripts/bench.py --name graphs_cpu --n 30 --cost-curve --decoders vanilla vanilla+spiffy@chain:3 \
  vanilla+spiffy@chain:5 vanilla+spiffy@chain:5/shared vanilla+spiffy@fig2 \
  vanilla+spiffy@fig2/shared vanilla+spiffy@chain:10 vanilla+spiffy@chain:10/shared
# Table 2 in shape: every base decoder with and without Spiffy (graphs calibrated per base, D=10)
python scripts/bench.py --name bases_cpu --n 30 --decoders vanilla vanilla+spiffy \
  fixed_k2 fixed_k2+spiffy fixed_k4 fixed_k4+spiffy threshold0.9 threshold0.9+spiffy \
  threshold0.8 threshold0.8+spiffy threshold0.7 threshold0.7+spiffy prefix prefix+spiffy \
  dual dual+spiffy dual_threshold0.9 dual_threshold0.9+spiffy
# the default job of run.py (lm-eval path, W&B offline)
python run.py
