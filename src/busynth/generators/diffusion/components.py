"""The parts of Stable Diffusion: VAE, UNet, text encoder, tokenizer and noise scheduler.

Two sources give the same diffusers/transformers classes, so every later stage (training,
LoRA, sampling, ControlNet) runs one code path:

* ``pretrained``: ``from_pretrained(<hub id or local folder>, subfolder=...)``, Stable
  Diffusion v1.5 by default (Rombach et al., "High-Resolution Image Synthesis with Latent
  Diffusion Models", CVPR 2022). Hub access follows the usual HF_HUB_OFFLINE rules; the
  tests only ever pass local folders.
* ``tiny``: AutoencoderKL, UNet2DConditionModel and CLIPTextModel built from
  :class:`TinyModelConfig` with random weights, sized for a CPU, and a CLIP BPE tokenizer
  built offline from the words of the prompts (no vocabulary file is ever downloaded).

Weights are read from safetensors files only (``use_safetensors=True``): a folder that holds
only pickled ``*.bin`` weights is refused with a clear error, never unpickled.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from busynth.checkpoint import from_pretrained
from busynth.errors import BusynthError, ConfigError, RunStateError
from busynth.generators.diffusion.settings import TinyModelConfig

logger = logging.getLogger(__name__)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Stable Diffusion v1's DDPM training schedule ("scaled_linear" betas, 1000 steps).
SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "clip_sample": False,
                "steps_offset": 1, "prediction_type": "epsilon"}


@dataclass
class Components:
    """The five parts of a Stable Diffusion pipeline."""

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler

    def pipeline(self, unet: UNet2DConditionModel | None = None) -> StableDiffusionPipeline:
        """A StableDiffusionPipeline over these parts (no safety checker); returns it on the parts' device."""
        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
            unet=unet if unet is not None else self.unet, scheduler=self.noise_scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )


def word_level_clip_tokenizer(texts: Sequence[str], max_length: int) -> CLIPTokenizer:
    """A CLIP BPE tokenizer trained offline on ``texts`` until every word of them is one token.

    Its vocabulary also holds every byte of CLIP's byte-level alphabet (with and without the
    end-of-word mark), so any other text still tokenizes, into pieces or bytes. The same texts
    give the same tokenizer in every process (``bpe_merges`` breaks ties by the pair itself;
    the Rust trainer of ``tokenizers`` breaks them by hash order, which changes per process).
    Returns the tokenizer; it saves and loads with ``save_pretrained`` / ``from_pretrained``
    like CLIP's own.
    """
    probe = CLIPTokenizer(vocab={BOS: 0, EOS: 1}, merges=[])
    backend = probe.backend_tokenizer
    words: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text)):
            words[(*word[:-1], word[-1] + "</w>")] += 1
    merges = bpe_merges(words)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {BOS: 0, EOS: 1}
    for symbol in [*alphabet, *(a + "</w>" for a in alphabet), *(a + b for a, b in merges)]:
        vocab.setdefault(symbol, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def bpe_merges(words: Mapping[tuple[str, ...], int]) -> list[tuple[str, str]]:
    """Byte-pair-encoding merges (Sennrich et al. 2016) learned from ``words`` (symbol tuples and
    their counts) until every word is one symbol: at each step the most frequent adjacent pair,
    ties broken by the pair itself, so the result depends on the words alone. Returns the merges
    in the order learned (their rank)."""
    words = dict(words)
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += count
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for symbols, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged


def _tiny_unet(cfg: TinyModelConfig, latent_size: int) -> UNet2DConditionModel:
    sizes = [latent_size // 2**i for i in range(len(cfg.unet_channels))]
    attend = [s <= cfg.attention_max_resolution for s in sizes]
    if not any(attend):
        raise ValueError(f"no UNet block at <= {cfg.attention_max_resolution} px latents: nothing to condition on")
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attend)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attend))
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        down_block_types=down, up_block_types=up, block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=cfg.unet_layers_per_block, cross_attention_dim=cfg.text_hidden_size,
        attention_head_dim=cfg.attention_head_dim, norm_num_groups=cfg.norm_num_groups,
        mid_block_type="UNetMidBlock2DCrossAttn",
    )


def build_tiny_components(cfg: TinyModelConfig, image_size: int, prompts: Sequence[str], seed: int = 0) -> Components:
    """Randomly initialised tiny Stable Diffusion parts for ``image_size`` px RGB images (weights
    depend only on ``seed``); the tokenizer knows the words of ``prompts``. Returns Components."""
    if image_size % (cfg.vae_factor * 2 ** (len(cfg.unet_channels) - 1)):
        raise ValueError(f"image_size {image_size} must be divisible by the autoencoder factor {cfg.vae_factor} "
                         f"times the UNet's {2 ** (len(cfg.unet_channels) - 1)}")
    tokenizer = word_level_clip_tokenizer(prompts, cfg.max_prompt_tokens)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        n_vae = len(cfg.vae_channels)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n_vae,
            up_block_types=("UpDecoderBlock2D",) * n_vae, block_out_channels=tuple(cfg.vae_channels),
            layers_per_block=cfg.vae_layers_per_block, latent_channels=cfg.latent_channels,
            norm_num_groups=cfg.norm_num_groups, sample_size=image_size,
        )
        unet = _tiny_unet(cfg, image_size // cfg.vae_factor)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=cfg.text_hidden_size, intermediate_size=2 * cfg.text_hidden_size,
            num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
            max_position_embeddings=cfg.max_prompt_tokens, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ))
    return Components(vae, unet, text_encoder, tokenizer, DDPMScheduler(**SD_SCHEDULER))


# --- loading saved or pretrained models: safetensors only, clear errors ------------------------

def load_pretrained_components(source: str | Path, dtype: torch.dtype = torch.float32, *,
                               what: str = "model folder", error: type[BusynthError] = RunStateError) -> Components:
    """Stable Diffusion parts from a hub id or a local folder in the diffusers layout (subfolders
    vae, unet, text_encoder, tokenizer, scheduler); returns Components in ``dtype``. Weights come
    from safetensors files only; a part that cannot be loaded raises ``error`` naming ``what``."""
    source = str(source)
    logger.info("loading Stable Diffusion components from %s", source)
    kw: dict[str, Any] = {"what": what, "error": error}
    return Components(
        vae=from_pretrained(AutoencoderKL, source, subfolder="vae", dtype=dtype, **kw),
        unet=from_pretrained(UNet2DConditionModel, source, subfolder="unet", dtype=dtype, **kw),
        text_encoder=from_pretrained(CLIPTextModel, source, subfolder="text_encoder", dtype=dtype, **kw),
        tokenizer=from_pretrained(CLIPTokenizer, source, subfolder="tokenizer", weights=False, **kw),
        noise_scheduler=from_pretrained(DDPMScheduler, source, subfolder="scheduler", weights=False, **kw),
    )


def load_components(
    source: str, *, pretrained_model: str | Path = "", tiny: TinyModelConfig | None = None,
    image_size: int = 128, prompts: Sequence[str] = (), seed: int = 0, dtype: torch.dtype = torch.float32,
    field: str = "pretrained_model",
) -> Components:
    """The Stable Diffusion parts for ``source`` = ``pretrained`` (from ``pretrained_model``) or
    ``tiny`` (random weights from ``tiny``, ``image_size``, ``prompts`` and ``seed``); returns Components.
    A pretrained model that cannot be loaded raises ConfigError naming the config ``field``."""
    if source == "pretrained":
        return load_pretrained_components(pretrained_model, dtype, what=field, error=ConfigError)
    if source == "tiny":
        return build_tiny_components(tiny or TinyModelConfig(), image_size, prompts, seed)
    raise ValueError(f"unknown components source {source!r} (use 'pretrained' or 'tiny')")


def freeze(*modules: torch.nn.Module) -> None:
    """Switch off gradients of every parameter of ``modules`` and put them in eval mode."""
    for module in modules:
        module.requires_grad_(False)
        module.eval()


# Weight dtypes of accelerate's mixed_precision settings.
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype the diffusion models are held in under ``mixed_precision``: its dtype on an
    accelerator, float32 on a CPU (where half-precision weights are slow)."""
    return WEIGHT_DTYPES[mixed_precision] if PartialState().device.type != "cpu" else torch.float32


def move_to(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move ``module`` to ``device``, casting only when ``dtype`` is not float32 (no needless copies)."""
    module.to(device)
    if dtype != torch.float32:
        module.to(dtype=dtype)
