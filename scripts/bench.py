"""`spiffy bench` from a checkout: see `spiffy.lab.bench_cli` (same arguments)."""

from spiffy.lab.bench_cli import main

if __name__ == "__main__":
    main()
