"""The tiny Stable Diffusion sizes the diffusion tests build (seconds on a CPU)."""

CLASSES = ["normal", "benign", "malignant"]
TINY_MODEL = {"vae_channels": [8, 8], "unet_channels": [16, 16], "norm_num_groups": 8, "text_hidden_size": 16,
              "attention_max_resolution": 16, "max_prompt_tokens": 24}
