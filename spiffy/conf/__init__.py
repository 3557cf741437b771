"""Hydra configuration of the runner (`spiffy run`): `pkg://spiffy.conf`, shipped inside the package."""
