"""Class-conditional VAE (method ``cvae``): the whole model, its training loop and sampling.

Kingma & Welling, "Auto-Encoding Variational Bayes" (2014) with the class conditioning of
Sohn et al., "Learning Structured Output Representation using Deep Conditional Generative
Models" (2015). The encoder sees the image plus the class embedding broadcast as extra
channels; the decoder sees ``[z, class embedding]`` and is FiLM-modulated by the class in
every block. Training anneals the KL weight linearly from 0 to ``beta`` (Bowman et al. 2016).

Artifact folder (nanoGPT style, the config lives inside it)::

    generator.json          name, config, classes, train ids, step, seed
    model.safetensors       final weights
    history.csv             step, loss, recon, kl, kl_weight, lr, seconds (one row per step)
    checkpoint-N/           the training engine's checkpoints (busynth.engine)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import PartialState
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import save_file
from torch import nn

from busynth.accel import local_rows
from busynth.checkpoint import list_checkpoints, read_safetensors
from busynth.config import MixedPrecision
from busynth.data.records import Record
from busynth.data.transforms import from_tensor, label_indices, stack_images, to_tensor
from busynth.engine import Stage, StageConfig, train_stage
from busynth.errors import RunStateError
from busynth.generators.base import Generator, Synthetic, read_generator_info, save_generator_info
from busynth.io import atomic_path, read_json

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"


class CVAEConfig(BaseModel):
    """Hyperparameters of the conditional VAE; defaults fit ~500 BUSI images in minutes on 2 CPU cores."""

    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(default=64, ge=8)
    channels: list[int] = Field(default_factory=lambda: [32, 64, 128, 256], min_length=1)
    latent_dim: int = Field(default=64, ge=1)
    class_embed_dim: int = Field(default=16, ge=1)
    steps: int = Field(default=800, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=2e-3, gt=0.0)
    # Cosine decay from lr to lr * min_lr_ratio over the run (stateless, so resume is exact).
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    beta: float = Field(default=1.0, ge=0.0)
    kl_warmup_steps: int = Field(default=200, ge=0)
    mixed_precision: MixedPrecision = "no"
    checkpoint_every: int = Field(default=200, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    sample_batch_size: int = Field(default=64, ge=1)

    @model_validator(mode="after")
    def _size_divisible(self) -> CVAEConfig:
        factor = 2 ** len(self.channels)
        if self.image_size % factor:
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2**len(channels) = {factor} "
                f"(one stride-2 stage per entry of channels={self.channels})"
            )
        if any(c < 1 for c in self.channels):
            raise ValueError(f"channels must be positive, got {self.channels}")
        return self


# --- pure math ---------------------------------------------------------------------------------


def kl_weight(step: int, warmup: int, beta: float) -> float:
    """KL weight at ``step``: linear from 0 (step 0) to ``beta`` at ``warmup`` (Bowman et al. 2016)."""
    if warmup <= 0:
        return float(beta)
    return float(beta) * min(1.0, step / warmup)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over latent dims, one value per row."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)


def reconstruction_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of logits against [0, 1] targets, summed over pixels, one value per row.

    Why BCE: intensities live in [0, 1]; BCE with soft targets is minimised exactly at
    sigmoid(logit) = target, so the decoder's mean image is the sigmoid of its logits, and the
    sum over pixels keeps the usual ELBO balance with the KL term at beta = 1. A Gaussian (MSE)
    likelihood needs a variance to tune against the KL; the continuous Bernoulli adds a
    normaliser whose mean is not sigmoid(logit). Neither helped enough to justify that here.
    """
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    return bce.flatten(1).sum(dim=1)


# --- the model ---------------------------------------------------------------------------------


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


class DownBlock(nn.Module):
    """Stride-2 4x4 conv, GroupNorm, SiLU: halves the resolution."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)
        self.norm = _norm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the downsampled feature map."""
        return F.silu(self.norm(self.conv(x)))


class UpBlock(nn.Module):
    """Nearest upsample x2, 3x3 conv, GroupNorm, class FiLM, SiLU (no checkerboard artefacts)."""

    def __init__(self, c_in: int, c_out: int, embed_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm = _norm(c_out)
        self.film = nn.Linear(embed_dim, 2 * c_out)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Return the upsampled feature map modulated by the class embedding."""
        h = self.norm(self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest")))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        return F.silu(h * (1.0 + scale) + shift)


class CVAE(nn.Module):
    """Convolutional conditional VAE for 1-channel images of ``config.image_size``."""

    def __init__(self, config: CVAEConfig, n_classes: int):
        super().__init__()
        self.config = config
        ch, e = config.channels, config.class_embed_dim
        self.bottom = config.image_size // 2 ** len(ch)
        flat = ch[-1] * self.bottom**2
        self.class_embed = nn.Embedding(n_classes, e)
        self.encoder = nn.ModuleList(DownBlock(c_in, c_out) for c_in, c_out in zip([1 + e, *ch[:-1]], ch))
        self.to_moments = nn.Linear(flat, 2 * config.latent_dim)
        self.from_latent = nn.Linear(config.latent_dim + e, flat)
        rev = ch[::-1]
        self.decoder = nn.ModuleList(UpBlock(c_in, c_out, e) for c_in, c_out in zip(rev, [*rev[1:], ch[0]]))
        self.to_logits = nn.Conv2d(ch[0], 1, 3, padding=1)

    def encode(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, 1, S, S) in [0, 1] and class indices (N,) -> (mu, logvar), each (N, latent_dim)."""
        emb = self.class_embed(y)[:, :, None, None].expand(-1, -1, *x.shape[-2:])
        h = torch.cat([x * 2.0 - 1.0, emb], dim=1)
        for block in self.encoder:
            h = block(h)
        mu, logvar = self.to_moments(h.flatten(1)).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)

    def decode(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Latents (N, latent_dim) and class indices (N,) -> pixel logits (N, 1, S, S)."""
        emb = self.class_embed(y)
        h = self.from_latent(torch.cat([z, emb], dim=1))
        h = F.silu(h).view(len(z), self.config.channels[-1], self.bottom, self.bottom)
        for block in self.decoder:
            h = block(h, emb)
        return self.to_logits(h)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode, reparameterise with the given standard-normal ``noise``, decode: (logits, mu, logvar)."""
        mu, logvar = self.encode(x, y)
        z = mu + noise * torch.exp(0.5 * logvar)
        return self.decode(z, y), mu, logvar


# --- checkpoints -------------------------------------------------------------------------------


def _save_weights(model: nn.Module, path: Path) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


# --- training ----------------------------------------------------------------------------------


class CVAEStage(Stage):
    """The cVAE's objective for :func:`busynth.engine.train_stage`: reconstruction (BCE) plus the
    KL term weighted by the warm-up of ``kl_weight`` at ``self.step``. Batches hold ``images``
    (N, 1, S, S) in [0, 1] and ``labels`` (N,); the reparameterisation noise comes from the
    step's generator, so a resumed fit continues exactly. The noise is drawn for the whole global
    batch and each process keeps its rows, so several processes train step by step as one does."""

    name = "cvae"
    global_batch = True

    def __init__(self, model: CVAE, cfg: CVAEConfig) -> None:
        self.model, self.cfg = model, cfg

    def loss(self, batch: Mapping[str, torch.Tensor],
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """recon + kl_weight * KL, averaged over this process's rows; logs recon, kl and the weight."""
        rows = local_rows(len(batch["labels"]))
        images, labels = batch["images"][rows], batch["labels"][rows]
        noise = torch.randn(len(batch["labels"]), self.cfg.latent_dim, generator=generator)[rows].to(images.device)
        logits, mu, logvar = self.model(images, labels, noise)
        recon = reconstruction_loss(logits, images).mean()
        kl = gaussian_kl(mu.float(), logvar.float()).mean()
        weight = kl_weight(self.step, self.cfg.kl_warmup_steps, self.cfg.beta)
        return recon + weight * kl, {"recon": float(recon.detach()), "kl": float(kl.detach()), "kl_weight": weight}


# --- the generator -----------------------------------------------------------------------------


class CVAEGenerator(Generator):
    """Class-conditional VAE generator: ``fit`` trains it, ``sample`` decodes z ~ N(0, T^2 I) per class."""

    name = "cvae"
    config_model = CVAEConfig
    # Fields that do not change the trained weights: a finished or checkpointed fit may differ in them.
    sampling_fields = frozenset({"temperature", "sample_batch_size", "checkpoint_every", "keep_checkpoints"})

    def __init__(self, config: BaseModel | dict | None = None, classes: Sequence[str] = ()):
        super().__init__(config, classes)
        self.model: CVAE | None = None
        self.step = 0

    def _identity(self, seed: int) -> dict:
        """Config, classes, training ids and seed: what a checkpoint or artifact records of its fit."""
        return {"config": self.config.model_dump(mode="json"), **self.fit_identity(seed)}

    def _training_identity(self, seed: int) -> dict:
        """The identity a checkpoint records: that of ``_identity`` without the sampling fields, so
        an interrupted fit resumes whatever they are now."""
        config = {k: v for k, v in self.config.model_dump(mode="json").items() if k not in self.sampling_fields}
        return {"config": config, **self.fit_identity(seed)}

    def fit(self, train_records: Sequence[Record], out_dir: Path, seed: int = 0) -> Path:
        """Train on ``train_records`` (training part only), resuming from the latest checkpoint in
        ``out_dir``; return ``out_dir`` holding ``model.safetensors`` and ``generator.json``."""
        cfg: CVAEConfig = self.config  # type: ignore[assignment]
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self._remember_training_ids(train_records)
        if (out_dir / MODEL_FILE).is_file() and (out_dir / "generator.json").is_file():
            self.check_same_fit(out_dir / "generator.json", read_generator_info(out_dir), seed)
            logger.info("cvae: %s already holds a finished model; not training again", out_dir)
            self._load_weights(out_dir / MODEL_FILE, cfg.steps)
            return out_dir

        images = to_tensor(stack_images(train_records, cfg.image_size))
        labels = torch.from_numpy(label_indices(train_records, self.classes))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CVAE(cfg, len(self.classes))
        if found := list_checkpoints(out_dir):  # a checkpoint of another fit is refused naming what differs
            self.check_same_fit(found[-1][1], read_json(found[-1][1] / "state.json").get("identity", {}), seed)
        stage = CVAEStage(model, cfg)
        # Adam (AdamW without decay), no clipping: the optimisation of Kingma & Welling.
        stage_cfg = StageConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, min_lr_ratio=cfg.min_lr_ratio,
                                weight_decay=0.0, max_grad_norm=None, prompt_dropout=0.0,
                                checkpoint_every=cfg.checkpoint_every, keep_checkpoints=cfg.keep_checkpoints)
        history = train_stage(stage, {"images": images, "labels": labels}, stage_cfg, out_dir, seed=seed,
                              mixed_precision=cfg.mixed_precision, identity=self._training_identity(seed),
                              precision_field="generators.cvae.mixed_precision")
        self.model = stage.model.eval()
        self.step = cfg.steps
        _save_weights(self.model, out_dir / MODEL_FILE)
        save_generator_info(out_dir, self.name, cfg, {**self._identity(seed), "step": cfg.steps})
        logger.debug("cvae: model in %s after %d logged steps", out_dir, len(history))
        return out_dir

    def _load_weights(self, path: Path, step: int) -> None:
        model = CVAE(self.config, len(self.classes))  # type: ignore[arg-type]
        weights, _ = read_safetensors(path)
        try:
            model.load_state_dict(weights)
        except RuntimeError as exc:  # missing, unexpected or differently shaped tensors
            raise RunStateError(f"{path}: weights do not fit the model of its generator.json ({exc})") from None
        self.model = model.to(PartialState().device).eval()
        self.step = step

    @classmethod
    def load(cls, directory: Path) -> CVAEGenerator:
        """Rebuild a fitted generator from ``generator.json`` + ``model.safetensors`` in ``directory``."""
        directory = Path(directory)
        info = read_generator_info(directory, expected=cls.name)
        gen = cls(info["config"], classes=info["classes"])
        gen.train_ids = list(info.get("train_ids", []))
        gen._load_weights(directory / MODEL_FILE, int(info.get("step", 0)))
        return gen

    @torch.no_grad()
    def sample(
        self, label: str, n: int, seed: int = 0, masks: Sequence[np.ndarray] | None = None
    ) -> list[Synthetic]:
        """``n`` uint8 (S, S) images of class ``label`` (mask None): the decoder's mean image for
        z ~ N(0, temperature^2 I). The first k of n equal the k of a call with n = k."""
        if self.model is None:
            raise RuntimeError("cvae: call fit() or load() before sample()")
        if label not in self.classes:
            raise ValueError(f"cvae: unknown label {label!r}; known classes: {self.classes}")
        cfg: CVAEConfig = self.config  # type: ignore[assignment]
        device = next(self.model.parameters()).device
        # numpy draws row after row, so sample(label, k, seed) is a prefix of sample(label, n, seed);
        # torch.randn on CPU switches algorithm with the tensor size and would break that.
        z_np = np.random.default_rng(seed).standard_normal((n, cfg.latent_dim), dtype=np.float32)
        z_all = torch.from_numpy(z_np) * cfg.temperature
        out: list[Synthetic] = []
        for start in range(0, n, cfg.sample_batch_size):
            z = z_all[start:start + cfg.sample_batch_size].to(device)
            y = torch.full((len(z),), self.classes.index(label), dtype=torch.long, device=device)
            images = from_tensor(torch.sigmoid(self.model.decode(z, y).float()))
            out.extend(Synthetic(image=img, label=label, mask=None, seed=seed) for img in images)
        return out
