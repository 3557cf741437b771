"""Graph and trajectory files on disk: atomic writes, JSON reads whose every failure names the path, path names."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (`/proc/self/status`)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting (not thread-safe, and brief)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and `os.replace`, so a concurrent
    reader sees either the old file or the new one, never a torn one.

    The file gets the permissions an ordinary `open(path, "w")` would (0666 minus the umask; a temporary file
    alone would be 0600, unreadable to collaborators sharing a store). Any OS error (a full disk, a read-only
    folder) is raised here, naming the path.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise OSError(err.errno, f"cannot write {str(path)!r}: {err.strerror or err}") from err
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: str | Path, what: str) -> object:
    """Parse the JSON file `path`; a missing file raises `FileNotFoundError`, unreadable bytes or invalid
    JSON raise `ValueError`, each naming `what` and the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} file {str(path)!r} is not UTF-8 text ({err})") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{what} file {str(path)!r} is not valid JSON (truncated or corrupted?): {err}"
        ) from err


def slug(name: str | Path) -> str:
    """A folder or file name for `name` (a model name or checkpoint path, a task, a device): its last path
    part, with every character but letters, digits and `-_.` replaced by `_`."""
    text = Path(str(name)).name or str(name)
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text) or "_"
