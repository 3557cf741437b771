"""Training utilities for small masked-diffusion LMs (LLaDA's SFT objective)."""
