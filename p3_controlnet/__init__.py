"""P3: ControlNet on a frozen Stable Diffusion v1.4, trained on Fill50k."""
