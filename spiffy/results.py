"""Append-only, crash-safe local result store: one JSON line per finished job (`results/runs/*.jsonl`).

Rows are written with a single `write` of one line plus `flush`/`fsync`, under an exclusive file lock, so
parallel sweep jobs never interleave. A job is identified by a hash of its resolved config (tracking and `force`
excluded); reruns skip jobs whose key already has a row. W&B is a mirror; this file is the source of truth.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path

import torch


def job_key(config: dict) -> str:
    relevant = {k: v for k, v in config.items() if k not in ("tracking", "force", "eval")}
    relevant["eval_compare_base"] = config.get("eval", {}).get("compare_base")
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


def git_state() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", None
    return {"git_sha": sha, "git_dirty": dirty}


def environment(device: str) -> dict:
    import transformers

    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor()
    return {
        "device": device,
        "device_name": name or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        **git_state(),
    }


def finished(path: str | Path, key: str) -> dict | None:
    """The stored row of job `key`, if any."""
    path = Path(path)
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn line from a crash is ignored, never fatal
        if row.get("job_key") == key:
            return row
    return None


def append_row(path: str | Path, row: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(row, default=str) + "\n"
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
        fcntl.flock(f, fcntl.LOCK_UN)


def read_rows(path: str | Path) -> list[dict]:
    """Every row of a JSONL file (or of every `*.jsonl` in a folder); a job rerun with `force=true` appends a
    new row for its key, and the newest row of each key wins. Torn lines are skipped."""
    rows: dict[object, dict] = {}
    for file in sorted(Path(path).glob("*.jsonl")) if Path(path).is_dir() else [Path(path)]:
        for n, line in enumerate(file.read_text().splitlines()):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows.pop(key := row.get("job_key") or (file, n), None)
            rows[key] = row
    return list(rows.values())
