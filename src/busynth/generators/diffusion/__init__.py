"""Stable Diffusion generators (sd-lora; ControlNet later): components, one training loop, LoRA, sampling."""
