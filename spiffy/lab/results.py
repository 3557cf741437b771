"""The result store: one JSON file per finished job, written atomically, in one folder per experiment.

Layout: `<results_dir>/<experiment>/<job_key>.json`. A row is written to a temporary file in the same folder,
flushed, fsync'd and renamed over its final name (`os.replace`), so a reader sees either no row or the whole row:
on one machine, or from many machines sharing a network filesystem, with no lock involved (advisory locks are
unreliable there). Readers merge the folders with the older append-only JSONL stores
(`<results_dir>/<experiment>.jsonl`, such as the committed `results/runs/*.jsonl`), which stay readable; the
newest row of a job key wins. A job key hashes the job's resolved config, without the settings that cannot change
its result (tracking, `force`, thread count, progress bars; graph settings when the job drafts nothing); a batch
size other than 1 (`eval.batch_size`, an experimental axis) is part of it. W&B is a mirror; this store is the source of truth. `spiffy.lab.claims` keeps identical concurrent jobs from
running twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from spiffy.graph.files import atomic_write_text as write_text_atomically

ROW_SUFFIX = ".json"


def speculates(config: dict) -> bool:
    """Whether a resolved job config drafts anything (Spiffy with a graph of at least one node)."""
    return (
        bool(config.get("decoder", {}).get("speculate"))
        and config.get("graph", {}).get("budget", 0) != 0
    )


def job_key(config: dict) -> str:
    """Hash of everything a job's result depends on.

    A job that does not speculate ignores its graph settings, so the vanilla jobs of a `graph.budget` sweep share
    one key (one run, the others skip). Keys of speculating jobs are unchanged from the JSONL era.
    """
    relevant = {
        k: v for k, v in config.items() if k not in ("tracking", "force", "eval", "dry_run")
    }
    relevant["eval_compare_base"] = config.get("eval", {}).get("compare_base")
    batch = config.get("eval", {}).get("batch_size", 1)
    if (
        str(batch) != "1"
    ):  # an experimental axis (throughput, and graph.budget=auto's costs); keys of
        relevant["eval_batch_size"] = batch  # batch-of-one jobs are unchanged

    if not speculates(config):
        relevant.pop("graph", None)
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def experiment_dir(results_dir: str | Path, experiment: str) -> Path:
    return Path(results_dir) / experiment


def row_path(results_dir: str | Path, experiment: str, key: str) -> Path:
    return experiment_dir(results_dir, experiment) / f"{key}{ROW_SUFFIX}"


def atomic_write_text(path: str | Path, text: str) -> None:
    """`spiffy.graph.files.atomic_write_text` (temporary file, fsync, rename: never a torn file), then an fsync
    of the folder so that the rename itself survives a crash."""
    write_text_atomically(path, text)
    _fsync_dir(Path(path).parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def write_row(results_dir: str | Path, row: dict) -> Path:
    """Store `row` (with `experiment` and `job_key`) as its own file; a rerun's row replaces the old one."""
    for field in ("experiment", "job_key"):
        if not row.get(field):
            raise ValueError(f"a result row needs a non-empty {field!r}, got {row.get(field)!r}")
    path = row_path(results_dir, row["experiment"], row["job_key"])
    atomic_write_text(path, json.dumps(row, default=str) + "\n")
    return path


def load_row(path: str | Path) -> dict:
    """One row file; a file that is not a JSON object raises ValueError naming it."""
    try:
        row = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a result row ({err})") from err
    if not isinstance(row, dict):
        raise ValueError(f"{path}: not a result row (a JSON {type(row).__name__})")
    return row


def _report_corrupt(err: ValueError, what: str) -> None:
    print(f"spiffy: warning: {err}; {what}", file=sys.stderr)


def finished(results_dir: str | Path, experiment: str, key: str) -> tuple[dict, Path] | None:
    """The stored row of job `key` and where it is: its row file, else the experiment's JSONL store.

    A row file that is not a row (truncated, corrupted) is reported with its path and counts as not finished:
    the job runs again and its new row replaces the file."""
    path = row_path(results_dir, experiment, key)
    if path.exists():
        try:
            return load_row(path), path
        except ValueError as err:
            _report_corrupt(err, "the job runs again and its row will replace this file")
    legacy = Path(results_dir) / f"{experiment}.jsonl"
    if legacy.exists():
        found = None
        for row in _jsonl_rows(legacy):
            if row.get("job_key") == key:
                found = row  # the newest row of the key wins, as in read_rows
        if found is not None:
            return found, legacy
    return None


def _jsonl_rows(path: Path):
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn line from a killed writer is skipped, never fatal
        if isinstance(row, dict):
            yield row


def append_row(path: str | Path, row: dict) -> None:
    """Append one row to a JSONL store (the older format), repairing a torn last line first.

    A writer killed mid-line leaves a last line without its newline; appending after it would glue the next row
    onto it and lose both. A last line that is a whole row only lacks its newline, which is added; a torn
    fragment is moved to `<path>.torn` (with a message) and the file cut back to its last complete line, under
    an exclusive lock (one machine; the per-job row files need none). The file is opened with `open`, so
    it honours the umask.
    """
    path = Path(path)
    line = json.dumps(row, default=str) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _append_locked(path, line)
    except OSError as err:
        raise OSError(err.errno, f"cannot append to {str(path)!r}: {err.strerror or err}") from err


def _append_locked(path: Path, line: str) -> None:
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            size = f.seek(0, os.SEEK_END)
            if size:
                f.seek(0)
                data = f.read()
                if not data.endswith(b"\n"):
                    cut = data.rfind(b"\n") + 1
                    if _is_row(data[cut:]):  # complete, only its newline missing: keep it
                        f.write(b"\n")
                    else:
                        torn_path = path.with_name(path.name + ".torn")
                        with open(torn_path, "ab") as torn:
                            torn.write(data[cut:] + b"\n")
                        f.truncate(cut)
                        print(
                            f"spiffy: warning: {path}: a torn last line ({size - cut} bytes) moved to {torn_path}",
                            file=sys.stderr,
                        )
            f.seek(0, os.SEEK_END)
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _is_row(fragment: bytes) -> bool:
    try:
        return isinstance(json.loads(fragment), dict)
    except (ValueError, UnicodeDecodeError):
        return False


def row_files(folder: Path) -> list[Path]:
    """The finished rows of one experiment folder (temporary files and claims are hidden files)."""
    return sorted(p for p in folder.glob(f"*{ROW_SUFFIX}") if not p.name.startswith("."))


def read_rows(path: str | Path) -> list[dict]:
    """Every row under `path`: a JSONL file, an experiment folder of row files, or a results folder holding
    both `*.jsonl` stores and experiment folders. The newest row of each job key wins (JSONL rows in file order,
    then row files, which are newer); torn JSONL lines are skipped."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no result store at {path}")
    rows: dict[object, dict] = {}

    def add(row: dict, fallback: object) -> None:
        rows.pop(key := row.get("job_key") or fallback, None)
        rows[key] = row

    if path.is_file():
        jsonl, folders = [path], []
    else:
        jsonl = sorted(path.glob("*.jsonl"))
        folders = [path] + sorted(p for p in path.iterdir() if p.is_dir() and p.name[0] != ".")
    for file in jsonl:
        for n, row in enumerate(_jsonl_rows(file)):
            add(row, (file, n))
    for folder in folders:
        for file in row_files(folder):
            try:
                add(load_row(file), file)
            except ValueError as err:  # one bad file must not hide the rest of the store
                _report_corrupt(err, "skipped")
    return list(rows.values())


def check_writable(folder: Path, probe_bytes: int = 64 << 10) -> None:
    """Create `folder` and write, fsync and remove a probe file of `probe_bytes` in it, so that a read-only
    store or a full disk fails before the evaluation, naming the folder (OSError)."""
    probe = (
        folder / f".write-probe-{platform.node()}-{os.getpid()}"
    )  # unique on a shared filesystem
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * probe_bytes)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise OSError(
            err.errno, f"the result store {str(folder)!r} is not writable: {err.strerror or err}"
        ) from err
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass  # the folder itself could not be made: reported above


def git_state() -> dict:
    root = Path(__file__).resolve().parents[2]
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


def cpu_name() -> str:
    """The CPU's model name (`/proc/cpuinfo` on Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str, dtype: str | None = None, invariant: bool = False) -> dict:
    """Where a row was measured: device and its name, dtype, torch threads, CPU count, versions, git state,
    the CPU instruction set and BLAS library, and whether invariant numerics was on (docs/numerics.md)."""
    import transformers

    from spiffy.models.numerics import machine

    name = (
        torch.cuda.get_device_name(torch.device(device))
        if device.startswith("cuda")
        else cpu_name()
    )
    return {
        "device": device,
        "device_name": name,
        "dtype": dtype,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "host": platform.node(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        **machine(),
        "invariant": invariant,
        **git_state(),
    }
