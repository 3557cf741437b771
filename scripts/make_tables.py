"""`spiffy tables` from a checkout: see `spiffy.lab.tables_cli` (same arguments)."""

from spiffy.lab.tables_cli import main

if __name__ == "__main__":
    main()
