"""The training objectives of the diffusion stages: autoencoder, base UNet, LoRA, ControlNet.

Each is a :class:`busynth.engine.Stage` trained by :func:`busynth.engine.train_stage` (one loop
for every model busynth trains). :class:`NoisePredictionStage` is the denoising objective of
DDPM (Ho et al., "Denoising Diffusion Probabilistic Models", NeurIPS 2020) in the latent space of
Stable Diffusion, with prompt dropout for classifier-free guidance (Ho & Salimans, "Classifier-Free
Diffusion Guidance", 2022) and optional min-SNR-gamma loss weighting (Hang et al., "Efficient
Diffusion Training via Min-SNR Weighting Strategy", ICCV 2023). Base-UNet, LoRA and ControlNet
training differ only by the stage's ``model`` and trainable parameters and by
``predict_noise`` (ControlNet overrides it to add the control residuals).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr
from torch import nn

from busynth.engine import Stage
from busynth.errors import ConfigError


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-gamma (Hang et al. 2023, eq. 9 and sec. 4.2).

    For an x0 loss the weight is min(SNR, gamma); expressed for an epsilon-prediction MSE it is
    min(SNR, gamma) / SNR, and for v-prediction min(SNR, gamma) / (SNR + 1). Returns a tensor
    shaped like ``snr``.
    """
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    raise ValueError(f"min-SNR weighting is defined for epsilon or v_prediction, not {prediction_type!r}")



class NoisePredictionStage(Stage):
    """The latent denoising loss of Stable Diffusion (Ho et al. 2020; Rombach et al. 2022).

    Batches hold ``moments`` (the autoencoder's posterior mean and log-variance, cached once)
    and ``prompt`` (an index into ``prompt_embeddings``, a tensor (P, T, D) of frozen
    text-encoder outputs; index ``empty_prompt`` is the empty prompt used for prompt dropout).
    ``model`` is the UNet (base and LoRA training) or whatever module ``predict_noise`` trains.
    """

    def __init__(self, name: str, model: nn.Module, unet: nn.Module, noise_scheduler: Any,
                 prompt_embeddings: torch.Tensor, empty_prompt: int, scaling_factor: float,
                 prompt_dropout: float = 0.0, snr_gamma: float | None = None) -> None:
        self.name, self.model, self.unet = name, model, unet
        self.noise_scheduler = noise_scheduler
        self.prompt_embeddings, self.empty_prompt = prompt_embeddings, empty_prompt
        self.scaling_factor, self.prompt_dropout, self.snr_gamma = scaling_factor, prompt_dropout, snr_gamma

    def predict_noise(self, batch: Mapping[str, torch.Tensor], noisy_latents: torch.Tensor,
                      timesteps: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """The network's prediction (epsilon or v) for noisy latents; the UNet on the text alone here."""
        return self.model(noisy_latents, timesteps, encoder_hidden_states=text_embeddings, return_dict=False)[0]

    def loss(self, batch: Mapping[str, torch.Tensor],
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """MSE between prediction and target, optionally min-SNR weighted; returns (loss, {})."""
        moments = batch["moments"]
        n, device = moments.shape[0], moments.device
        mean, logvar = moments.float().chunk(2, dim=1)
        eps_latent = torch.randn(mean.shape, generator=generator).to(device)
        latents = (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps_latent) * self.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,),
                                  generator=generator).to(device)
        drop = (torch.rand(n, generator=generator) < self.prompt_dropout).to(device)
        prompts = torch.where(drop, torch.full_like(batch["prompt"], self.empty_prompt), batch["prompt"])
        text = self.prompt_embeddings.to(device)[prompts]
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        weight_dtype = next(self.unet.parameters()).dtype
        pred = self.predict_noise(batch, noisy.to(weight_dtype), timesteps, text.to(weight_dtype))
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ConfigError(f"noise scheduler prediction_type {prediction_type!r} is not supported")
        if self.snr_gamma is None:
            return F.mse_loss(pred.float(), target.float()), {}
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(dim=1)
        weights = min_snr_weights(compute_snr(self.noise_scheduler, timesteps), self.snr_gamma, prediction_type)
        return (per_sample * weights).mean(), {}


class _AutoencoderObjective(nn.Module):
    """Wraps an AutoencoderKL so that one ``forward`` returns (reconstruction, mean, logvar)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode, reparameterise with the standard-normal ``eps``, decode."""
        posterior = self.vae.encode(pixels).latent_dist
        z = posterior.mean + posterior.std * eps
        return self.vae.decode(z).sample, posterior.mean, posterior.logvar


class AutoencoderStage(Stage):
    """KL-regularised autoencoder of latent diffusion (Rombach et al. 2022): L1 reconstruction of
    random ``crop`` x ``crop`` crops (randomly flipped) plus ``kl_weight`` x KL to N(0, I).

    Batches hold ``pixels`` (N, 3, S, S) in [-1, 1]. The perceptual and adversarial terms of the
    original are left out (no pretrained network may be downloaded), so reconstructions are
    somewhat smoother than SD's. Crops make a step cheaper: the network is fully convolutional.
    """

    def __init__(self, vae: nn.Module, crop: int, kl_weight: float = 1e-6, name: str = "autoencoder") -> None:
        self.name, self.model, self.crop, self.kl_weight = name, _AutoencoderObjective(vae), crop, kl_weight

    @property
    def vae(self) -> nn.Module:
        """The (unwrapped) autoencoder being trained."""
        return getattr(self.model, "module", self.model).vae

    def loss(self, batch: Mapping[str, torch.Tensor],
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """L1 + kl_weight * KL (summed over latent elements, averaged over the batch); logs l1 and kl."""
        pixels = batch["pixels"]
        n, size = pixels.shape[0], pixels.shape[-1]
        crop = min(self.crop, size)
        offsets = torch.randint(0, size - crop + 1, (n, 2), generator=generator).tolist()
        flips = (torch.rand(n, generator=generator) < 0.5).tolist()
        crops = [pixels[i, :, y:y + crop, x:x + crop] for i, (y, x) in enumerate(offsets)]
        x = torch.stack([c.flip(-1) if f else c for c, f in zip(crops, flips)]).float()
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        eps = torch.randn((n, self.vae.config.latent_channels, crop // factor, crop // factor),
                          generator=generator).to(x.device)
        recon, mean, logvar = self.model(x.to(next(self.model.parameters()).dtype), eps)
        l1 = (recon.float() - x).abs().mean()
        kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float()).flatten(1).sum(1).mean()
        return l1 + self.kl_weight * kl, {"l1": float(l1.detach()), "kl": float(kl.detach())}


class ControlNetStage(NoisePredictionStage):
    """Noise prediction of the frozen UNet plus the residuals of a trainable ControlNet on ``batch["mask"]``.

    Batches hold ``moments``, ``prompt`` (see :class:`NoisePredictionStage`) and ``mask``
    (N, 1, H, W) at pixel resolution, repeated here to the ControlNet's conditioning channels.
    """

    def __init__(self, controlnet: nn.Module, unet: nn.Module, noise_scheduler: Any,
                 prompt_embeddings: torch.Tensor, empty_prompt: int, scaling_factor: float,
                 prompt_dropout: float = 0.0, snr_gamma: float | None = None, name: str = "controlnet") -> None:
        super().__init__(name, controlnet, unet, noise_scheduler, prompt_embeddings, empty_prompt, scaling_factor,
                         prompt_dropout, snr_gamma)

    def predict_noise(self, batch: Mapping[str, torch.Tensor], noisy_latents: torch.Tensor,
                      timesteps: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction with the ControlNet's residuals added to its skip connections and middle block."""
        controlnet = getattr(self.model, "module", self.model)
        cond = batch["mask"].to(noisy_latents.dtype)
        cond = cond.expand(-1, controlnet.config.conditioning_channels, -1, -1)
        down, mid = self.model(noisy_latents, timesteps, encoder_hidden_states=text_embeddings,
                               controlnet_cond=cond, return_dict=False)
        dtype = noisy_latents.dtype
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=text_embeddings,
                         down_block_additional_residuals=[d.to(dtype) for d in down],
                         mid_block_additional_residual=mid.to(dtype), return_dict=False)[0]
