"""Decoding: the one semi-autoregressive block loop (rules × cache modes) and Spiffy's speculative walk."""
