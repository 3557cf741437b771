#!/usr/bin/env bash
# Regenerate every committed result of the README and the model card (results/, CPU, about an hour on 2 cores).
#
#   bash scripts/reproduce_results.sh              # from scratch: clears results/runs, results/graphs, results/tables
#   KEEP=1 bash scripts/reproduce_results.sh       # resume after a crash: finished run.py jobs and graphs are kept
#
# Each step is one documented command; what it writes is listed in results/README.md. User runs default to the
# untracked runs/; this script alone writes the committed reference results, by passing results/ explicitly
# (results_dir, graph.root, and RESULTS_DIR/GRAPH_ROOT/TABLES_DIR/BENCH_DIR for experiments/*/launch.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 WANDB_SILENT=true
export RESULTS_DIR=results/runs GRAPH_ROOT=results/graphs TABLES_DIR=results/tables BENCH_DIR=results/bench
if [ -z "${KEEP:-}" ]; then
  rm -rf results/runs/*.jsonl results/runs/*/ results/graphs results/tables
fi
STORE=(results_dir=results/runs graph.root=results/graphs)
step() { printf '\n=== %s\n' "$*"; "$@"; }

# model card: accuracy and confidence of the embedded model (vanilla, T=0, 200 held-out problems)
step python scripts/eval_embedded.py --n 200 --json results/embedded_eval.json
# calibrated graphs committed for the embedded model (1 token/step, task settings), D in {3,5,8,10}
step python scripts/calibrate_graph.py --budgets 3 5 8 10 --rules degree1 greedy --n 20 --root results/graphs
# Tables 1/4, sample efficiency, transfer, Spiffy over each base: exact NFE replayed on 200 held-out problems
step python scripts/calibration_study.py --n-test 200 --out results/tables
# issue 21: chain (FreeDave) vs degree1 vs greedy vs best, per base and walk, replayed on 100 held-out problems
step python scripts/selection_study.py --n-test 100 --spot 10 --out results/tables
# noise-aware drafting: acceptance vs temperature (docs/algorithm.md §5.7)
step python scripts/temperature_study.py --n-test 100 --measure 20 --out results/tables
# wall-clock, side by side in one process: chain/fig2 graphs in exact and shared layouts
step python scripts/bench.py --out results/bench --name graphs_cpu --n 30 --decoders vanilla vanilla+spiffy@chain:3 \
  vanilla+spiffy@chain:5 vanilla+spiffy@chain:5/shared vanilla+spiffy@fig2 \
  vanilla+spiffy@fig2/shared vanilla+spiffy@chain:10 vanilla+spiffy@chain:10/shared
# Table 2 in full: every base decoder with and without Spiffy (graphs calibrated per base, D=8 as in the paper);
# bases are decoder presets (spiffy/conf/decoder) with overrides, `<preset>[:key=value,...]`
step python scripts/bench.py --out results/bench --name bases_cpu --n 30 --graph calibrated:8 --decoders vanilla vanilla+spiffy \
  vanilla:rule=fixed_k,k=2 vanilla:rule=fixed_k,k=2+spiffy vanilla:rule=fixed_k,k=4 \
  vanilla:rule=fixed_k,k=4+spiffy multi_token multi_token+spiffy multi_token:tau=0.8 multi_token:tau=0.8+spiffy \
  multi_token:tau=0.7 multi_token:tau=0.7+spiffy kv_cache:cache=prefix kv_cache:cache=prefix+spiffy \
  kv_cache kv_cache+spiffy kv_cache:rule=threshold,tau=0.9 kv_cache:rule=threshold,tau=0.9+spiffy
# SDAR (fixture model, tests/fixtures): model calls of the reference loop, its fusions, Spiffy (docs/algorithm.md §12)
step python scripts/sdar_fusions.py --out results/tables
# the embedded block-causal model tiny-sdar-arith: model card accuracy (SDAR base, 1 token/step, stop at EOS)
step python scripts/eval_embedded.py --model tiny-sdar-arith --n 200 --gen '{"stop_ids": [96]}' \
  --json results/tiny_sdar_eval.json
# ... its wall-clock table: SDAR bases vs + Spiffy (calibrated D, fusions, chain graphs), 1 thread, float32
step python scripts/bench.py --out results/bench --model tiny-sdar-arith --model-name tiny-sdar-arith --threads 1 --n 200 \
  --gen '{"stop_ids": [96]}' --cost-curve --name sdar_cpu --decoders sdar sdar_dynamic \
  sdar+spiffy@calibrated:3 sdar+spiffy@calibrated:5 sdar+spiffy@calibrated:10 sdar:fuse_next=true \
  sdar:fuse_next=true+spiffy@calibrated:3/fused sdar:fuse_next=true+spiffy@calibrated:5/fused \
  sdar:fuse_next=true+spiffy@calibrated:10/fused sdar+spiffy@chain:3 sdar+spiffy@chain:5 sdar+spiffy@chain:10 \
  sdar_dynamic+spiffy@calibrated:10
# ... and the block-length x D sweep (one model copy per block length, all interleaved in one process)
step python scripts/bench.py --out results/bench --model tiny-sdar-arith --model-name tiny-sdar-arith --threads 1 --n 100 \
  --gen '{"stop_ids": [96]}' --cost-curve --block-sizes 8 4 16 --name sdar_sweep_cpu --decoders sdar \
  sdar:fuse_next=true sdar+spiffy@calibrated:3 sdar+spiffy@calibrated:5 \
  sdar:fuse_next=true+spiffy@calibrated:2/fused sdar:fuse_next=true+spiffy@calibrated:3/fused \
  sdar:fuse_next=true+spiffy@calibrated:5/fused sdar:fuse_next=true+spiffy@calibrated:8/fused
# graph.budget=auto against its base and every fixed D, side by side (vanilla, prefix and dual caches, threshold 0.9)
step python scripts/auto_study.py --out results/auto --n 30 --rounds 3 --root /tmp/spiffy_auto_graphs
# the default job of run.py (lm-eval path, W&B offline) and the README's example sweeps
step python run.py "${STORE[@]}" eval.progress=false
step python run.py -m "${STORE[@]}" eval.progress=false decoder=vanilla,spiffy graph.budget=3,5,8,10
step python run.py "${STORE[@]}" eval.progress=false decoder=kv_cache decoder.speculate=true
# one sweep per paper table/figure (experiments/<name>/launch.sh: run.py -m ... then make_tables.py)
for experiment in table1 table2 table3 table4 calib_efficiency transfer fig5 cross_block auto sdar_v4 \
  sdar_v4_embedded; do
  step "experiments/$experiment/launch.sh" eval.progress=false
done
step python scripts/make_tables.py --experiment default --results results/runs --out results/tables
