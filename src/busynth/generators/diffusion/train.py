"""One training loop (accelerate) for every diffusion stage: autoencoder, base UNet, LoRA, ControlNet.

A :class:`Stage` says *what* trains (``model``, ``trainable_parameters()``) and *how the loss
is computed* (``loss(batch, generator)``); :func:`train_stage` does everything else: device
placement and mixed precision, gradient accumulation and clipping, the learning-rate
schedule, ``checkpoint-N/`` folders with a cap, resume from the latest one, progress
(``busynth.progress``: a bar on a terminal, a line every ~30 s elsewhere) and ``history.csv``.
:class:`NoisePredictionStage` is the denoising objective of DDPM (Ho et
al., "Denoising Diffusion Probabilistic Models", NeurIPS 2020) in the latent space of Stable
Diffusion, with prompt dropout for classifier-free guidance (Ho & Salimans, "Classifier-Free
Diffusion Guidance", 2022) and optional min-SNR-gamma loss weighting (Hang et al., "Efficient
Diffusion Training via Min-SNR Weighting Strategy", ICCV 2023). Base-UNet, LoRA and ControlNet
training differ only by the stage's ``model`` and trainable parameters and by
``predict_noise`` (ControlNet overrides it to add the control residuals).

Every random draw of optimizer step ``s`` -- the batch, noise, timesteps, prompt dropout,
crops -- comes from generators seeded by ``(seed, s)``, so a run resumed from
``checkpoint-s`` continues exactly as an uninterrupted run would.

Checkpoint folder ``checkpoint-N/``: ``trainable.safetensors`` (the trainable parameters),
``optimizer.safetensors`` (optimizer tensors, param groups in the metadata) and
``state.json`` (step, seed, stage name, the stage config and ``identity`` of the caller).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from busynth.accel import broadcast_buffers, local_rows, make_accelerator, rank_and_world
from busynth.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from busynth.errors import ConfigError, RunStateError
from busynth.io import derived_seed, read_history_csv, read_json, write_rows_csv
from busynth.progress import log_fit, progress

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
HISTORY_FILE = "history.csv"
# Streams of per-step randomness: batch order (seeded by epoch) and everything else (by micro-step).
_STREAM_ORDER, _STREAM_STEP = 0, 1


class StageConfig(BaseModel):
    """Optimisation settings of one training stage."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=500, ge=0)
    batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    lr: float = Field(default=1e-4, gt=0.0)
    # Linear warm-up, then cosine decay to lr * min_lr_ratio (Loshchilov & Hutter 2017), or constant.
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    weight_decay: float = Field(default=1e-2, ge=0.0)
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    # Min-SNR-gamma weighting of the denoising loss (Hang et al. 2023); None = plain MSE.
    snr_gamma: float | None = Field(default=None, gt=0.0)
    # Probability of replacing a prompt by the empty prompt (for classifier-free guidance).
    prompt_dropout: float = Field(default=0.1, ge=0.0, le=1.0)
    checkpoint_every: int = Field(default=250, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)


# --- pure math ---------------------------------------------------------------------------------


def learning_rate(step: int, cfg: StageConfig) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warm-up to ``cfg.lr`` over
    ``warmup_steps``, then constant or half a cosine down to ``lr * min_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


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


def batch_indices(n: int, batch_size: int, micro_step: int, seed: int) -> torch.Tensor:
    """Row indices of micro-batch ``micro_step``: consecutive slices of a permutation of ``n``
    rows drawn per epoch from (seed, epoch); returns an int64 tensor of min(batch_size, n) rows."""
    bs = min(batch_size, n)
    per_epoch = max(1, n // bs)
    epoch, pos = divmod(micro_step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed(seed, epoch, _STREAM_ORDER)))
    return order[pos * bs:(pos + 1) * bs]


# --- stages --------------------------------------------------------------------------------------


class Stage:
    """What one training stage trains and how its loss is computed; ``train_stage`` runs it.

    ``model`` is the module whose parameters train (the loop hands it to ``accelerator.prepare``
    and stores the prepared module back); ``trainable_parameters`` are the parameters the
    optimizer updates and checkpoints hold.
    """

    name: str = "stage"
    model: nn.Module

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates (default: those of ``model`` that require grad)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def loss(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar loss of one micro-batch and extra numbers to log; draw randomness from ``generator``."""
        raise NotImplementedError


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

    def loss(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """MSE between prediction and target, optionally min-SNR weighted; returns (loss, {})."""
        moments = batch["moments"]
        n, device = moments.shape[0], moments.device
        mean, logvar = moments.float().chunk(2, dim=1)
        eps_latent = torch.randn(mean.shape, generator=generator).to(device)
        latents = (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps_latent) * self.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,), generator=generator).to(device)
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

    def loss(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
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


# --- accelerator and checkpoints -------------------------------------------------------------------


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().cpu().contiguous() for k, p in model.named_parameters() if p.requires_grad}


def _load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    weights = load_checkpoint(folder, optimizer)
    expected = {k for k, p in model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        raise RunStateError(f"{folder}: trainable parameters differ from this stage's "
                            f"({len(set(weights) ^ expected)} names differ)")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)


def train_stage(stage: Stage, data: Mapping[str, torch.Tensor], cfg: StageConfig, out_dir: Path, seed: int = 0,
                mixed_precision: str = "no", identity: Mapping[str, Any] | None = None,
                cpu: bool = False) -> list[dict[str, Any]]:
    """Train ``stage`` for ``cfg.steps`` optimizer steps on ``data`` (tensors with equal first
    dimension; each micro-batch is a row subset) and return the history rows of the whole run.

    Resumes from the latest ``checkpoint-N`` in ``out_dir`` (refusing one written by a stage
    with another name, seed, config or ``identity``); writes checkpoints every
    ``cfg.checkpoint_every`` steps and at the end, keeping the newest ``cfg.keep_checkpoints``.
    On return ``stage.model`` holds the trained (unwrapped) module.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_rows = {len(v) for v in data.values()}
    if len(n_rows) != 1 or 0 in n_rows:
        raise ValueError(f"{stage.name}: training data must be non-empty tensors of equal length, got {n_rows}")
    n = n_rows.pop()
    run = {"version": CHECKPOINT_VERSION, "stage": stage.name, "seed": seed,
           "config": cfg.model_dump(mode="json"), "identity": dict(identity or {}), "rows": n}
    accelerator = make_accelerator(mixed_precision, cfg.grad_accum, cpu, field="mixed_precision")
    rank = rank_and_world()[0]
    params = stage.trainable_parameters()
    if not params:
        raise ValueError(f"{stage.name}: no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if found := list_checkpoints(out_dir):
        start, folder = found[-1]
        saved = read_json(folder / "state.json")
        differ = [k for k in run if k != "version" and saved.get(k) != run[k]]
        if saved.get("version") != CHECKPOINT_VERSION or differ:
            raise RunStateError(f"{folder} was written by a different {stage.name} run "
                                f"({', '.join(differ) or 'version'} differ); use a new folder or delete it")
        _load_checkpoint(folder, stage.model, optimizer)
        logger.info("%s: resuming from %s", stage.name, folder)
    stage.model, optimizer = accelerator.prepare(stage.model, optimizer)
    data = {k: v.to(accelerator.device) for k, v in data.items()}
    history = read_history_csv(out_dir / HISTORY_FILE, start)
    stage.model.train()
    bar = progress(cfg.steps, stage.name, initial=start, enabled=accelerator.is_local_main_process, log=logger)
    for step in range(start, cfg.steps):
        started = time.perf_counter()
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum, extras = 0.0, {}
        for micro in range(step * cfg.grad_accum, (step + 1) * cfg.grad_accum):
            # Every process draws the same global batch and computes its share of the rows, with
            # its own noise stream (process 0's is the single-process one); DDP averages gradients.
            stream = _STREAM_STEP + 2 * rank
            generator = torch.Generator().manual_seed(derived_seed(seed, micro, stream))
            torch.manual_seed(derived_seed(seed, micro, stream + 1))  # any dropout inside the model
            idx = batch_indices(n, cfg.batch_size, micro, seed)
            idx = idx[local_rows(len(idx))].to(accelerator.device)
            batch = {k: v[idx] for k, v in data.items()}
            with accelerator.accumulate(stage.model), accelerator.autocast():
                loss, extras = stage.loss(batch, generator)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += float(accelerator.reduce(loss.detach(), "mean")) / cfg.grad_accum
        row = {"step": step, "loss": loss_sum, **extras, "lr": lr, "seconds": round(time.perf_counter() - started, 4)}
        history.append(row)
        bar.update(1, loss=loss_sum)
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:  # the main process commits the files
            write_rows_csv(out_dir / HISTORY_FILE, history)
            save_checkpoint(out_dir, done, _trainable_state(accelerator.unwrap_model(stage.model)),
                            optimizer, run, cfg.keep_checkpoints)
    bar.close()
    stage.model = accelerator.unwrap_model(stage.model)
    broadcast_buffers(stage.model)
    stage.model.eval()
    if history:
        resumed = {"resumed_at_step": start} if start else {}
        log_fit(stage.name, bar.count, bar.elapsed, log=logger, **resumed, last_loss=float(history[-1]["loss"]))
    return history
