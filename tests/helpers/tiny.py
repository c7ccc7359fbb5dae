"""Tiny models the tests build in seconds on a CPU: Stable Diffusion sizes, and a random ResNet saved
as the hub's image classifiers are (to load through the same from_pretrained path as pretrained weights)."""

from pathlib import Path

CLASSES = ["normal", "benign", "malignant"]
TINY_MODEL = {"vae_channels": [8, 8], "unet_channels": [16, 16], "norm_num_groups": 8, "text_hidden_size": 16,
              "attention_max_resolution": 16, "max_prompt_tokens": 24}


def tiny_resnet(folder: Path, seed: int = 0) -> Path:
    """A random transformers ResNet image classifier saved to ``folder`` as the hub's are (``resnet.*``
    weights and a head, safetensors), 4 stages of widths 8-32; returns ``folder``."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], layer_type="basic")
    ResNetForImageClassification(config).save_pretrained(folder)
    return folder
