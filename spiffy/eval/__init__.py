"""Evaluation: offline scoring loops, the lm-eval LM class and task presets."""
