"""Calibration: trajectories of the base decoder, graph selection and replay, the cost model and autotune (docs/algorithm.md §5-§6)."""
