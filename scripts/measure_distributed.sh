#!/usr/bin/env bash
# 1 process vs N processes (torchrun, gloo on CPU) for the same job: run.py task.limit=64 with its defaults (Spiffy
# over the dual cache, graph.budget=auto, the base decoder beside it), 1 thread per process, each run with its own
# graph folder (so each calibrates). Prints end-to-end times, the rows' phases and the evaluation-phase speedup.
#   bash scripts/measure_distributed.sh            # N=2, LIMIT=64, OUT=runs/measure_distributed
set -euo pipefail
cd "$(dirname "$0")/.."
N="${N:-2}" LIMIT="${LIMIT:-64}" OUT="${OUT:-runs/measure_distributed}"
rm -rf "$OUT" && mkdir -p "$OUT"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
args=(task.limit="$LIMIT" eval.threads=1 eval.progress=false tracking=disabled)
run() {  # name, launcher...
  local name=$1 && shift
  echo "$name: load before: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/load.txt"
  local t0 && t0=$(date +%s.%N)
  "$@" run.py "${args[@]}" results_dir="$OUT/$name/results" graph.root="$OUT/$name/graphs" \
    hydra.run.dir="$OUT/$name/hydra" > "$OUT/$name.log" 2>&1
  echo "$name $t0 $(date +%s.%N)" >> "$OUT/end_to_end.txt"
  echo "$name: load after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/load.txt"
}
run one python
run "n$N" python -m torch.distributed.run --standalone --nproc-per-node "$N"
python - "$OUT" "$N" <<'PY'
import json, sys
from pathlib import Path
out, n = Path(sys.argv[1]), sys.argv[2]
e2e = {}
for line in (out / "end_to_end.txt").read_text().splitlines():
    name, t0, t1 = line.split()
    e2e[name] = float(t1) - float(t0)
rows = {}
for name in ("one", f"n{n}"):
    (path,) = (out / name / "results").rglob("*.json")
    rows[name] = json.loads(path.read_text())
print("| processes | end to end s | model load s | graph (calibration) s | evaluation s | rest (imports, lm-eval setup, row) s | D* | accuracy | NFE speedup |")
print("|---|---|---|---|---|---|---|---|---|")
for name, row in rows.items():
    m, total = row["metrics"], float(e2e[name])
    rest = total - m["load_s"] - m["graph_load_s"] - m["eval_s"]
    print(f"| {m['world_size']} | {total:.1f} | {m['load_s']:.1f} | {m['graph_load_s']:.1f} | {m['eval_s']:.1f} | "
          f"{rest:.1f} | {m.get('auto_budget', '-')} | {m['accuracy']:.3f} | {m['speedup_nfe']:.2f} |")
one, many = rows["one"]["metrics"], rows[f"n{n}"]["metrics"]
print(f"evaluation phase: {one['eval_s'] / many['eval_s']:.2f}x with {n} processes; "
      f"end to end: {float(e2e['one']) / float(e2e[f'n{n}']):.2f}x")
PY
