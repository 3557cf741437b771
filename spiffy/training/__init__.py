"""Training utilities for the small embedded dLLMs: LLaDA's SFT and SDAR's block-diffusion objectives, the shared
resumable loop, and the LLaDA -> SDAR warm start."""
