"""P5: CLIP zero-shot classification and textual inversion on Stable Diffusion v1.4."""
