"""`spiffy`, the console command: one registry of subcommands (`spiffy run`, `spiffy bench`, `spiffy tables`,
`spiffy env`) and `spiffy --version`.

A subcommand is a function `argv -> exit status` registered with `@command(name, summary)`; it parses its own
arguments (`spiffy <name> --help`). New ones (`spiffy serve`, `spiffy chat`) register the same way, here or in the
module that owns them, listed in `SUBCOMMAND_MODULES`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

COMMANDS: dict[str, tuple[str, Callable[[list[str]], int | None]]] = {}
# modules imported before dispatch, for the subcommands they register (e.g. "spiffy.serve.cli")
SUBCOMMAND_MODULES: list[str] = ["spiffy.serve.cli"]


def command(name: str, summary: str):
    """Register `fn(argv) -> int | None` as `spiffy <name>`."""

    def register(fn):
        if name in COMMANDS:
            raise ValueError(f"spiffy subcommand {name!r} is registered twice")
        COMMANDS[name] = (summary, fn)
        return fn

    return register


@command(
    "run",
    "run a job or a sweep: Hydra overrides, -m for sweeps, --dry-run lists the jobs, --help the keys",
)
def _run(argv: list[str]) -> int:
    from spiffy.lab.runner import main

    return main(argv)


@command(
    "bench", "benchmark decoders side by side (spiffy bench --help); writes runs/bench unless --out"
)
def _bench(argv: list[str]) -> int:
    from spiffy.lab.bench_cli import main

    main(argv)
    return 0


@command(
    "tables",
    "tables and plots from result rows (spiffy tables --help); runs/results -> runs/tables",
)
def _tables(argv: list[str]) -> int:
    from spiffy.lab.tables_cli import main

    main(argv)
    return 0


@command("env", "versions, device, CPU instruction set and BLAS, for bug reports")
def _env(argv: list[str]) -> int:
    if argv:
        raise SystemExit(f"spiffy env takes no arguments, got {argv}")
    for key, value in environment_report().items():
        print(f"{key}: {value}")
    return 0


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("spiffy")
    except PackageNotFoundError:
        return "unknown (not installed)"


def environment_report() -> dict[str, str]:
    """What a bug report needs: package versions, Python, the device torch sees, the CPU instruction set torch
    dispatches to, and the BLAS/LAPACK it was built with."""
    import platform
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    import torch

    report = {
        "spiffy": version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for dist in (
        "torch",
        "transformers",
        "lm_eval",
        "hydra-core",
        "omegaconf",
        "wandb",
        "datasets",
    ):
        try:
            report[dist] = dist_version(dist)
        except PackageNotFoundError:
            report[dist] = "not installed"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        report["device"] = f"cuda ({', '.join(names)}; CUDA {torch.version.cuda})"
    else:
        report["device"] = "cpu (no CUDA device)"
    report["cpu"] = platform.processor() or platform.machine()
    report["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    report["torch_threads"] = str(torch.get_num_threads())
    config = torch.__config__.show()
    blas = [line.strip() for line in config.splitlines() if "BLAS" in line or "LAPACK" in line]
    report["blas"] = "; ".join(blas) or "not reported by torch"
    report["mkl"] = str(torch.backends.mkl.is_available())
    return report


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: spiffy <command> [args]   (spiffy <command> --help for its arguments)", ""]
    lines += [f"  {name:<{width}}  {summary}" for name, (summary, _) in COMMANDS.items()]
    lines += ["", "  --version  the installed spiffy version"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import importlib

    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"spiffy {version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"spiffy: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    sys.argv = [f"spiffy {name}", *rest]
    return COMMANDS[name][1](rest) or 0


if __name__ == "__main__":
    sys.exit(main())
