"""Classifier networks: a compact ResNet for 1-channel images, and transformers / timm / torchvision models.

Every model built here takes float images (N, 1, S, S) in [0, 1] (what
``busynth.data.transforms.to_tensor`` returns), normalises them itself, returns
logits (N, n_classes) from ``forward`` and penultimate features (N, D) from
``features`` -- the feature space in which fidelity scores (FID, KID,
precision/recall) are computed.
"""

from __future__ import annotations

import importlib
import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from busynth.checkpoint import from_pretrained
from busynth.config import ClassifierConfig
from busynth.errors import ConfigError

logger = logging.getLogger(__name__)

# Seconds any network access (weight download) may stall before it fails.
WEIGHTS_TIMEOUT_S = 30.0
# Grey-level ImageNet statistics: the mean / std of the RGB means (for pretrained models).
IMAGENET_GREY_MEAN, IMAGENET_GREY_STD = 0.449, 0.226


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (He et al. 2016, arXiv:1512.03385)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block output, same spatial size (stride 1) or halved (stride 2)."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CompactResNet(nn.Module):
    """A small ResNet: stride-2 stem, 4 stages of BasicBlocks, global pool, dropout, linear head.

    Stage widths are ``width * (1, 2, 4, 8)``; stages 2-4 halve the resolution. The
    stem (5x5 conv, stride 2, then a 2x2 max-pool) reduces a 128 px image to 32 px
    before the first stage, which keeps CPU training fast. With ``mask_head`` a 1x1 conv on the
    penultimate stage predicts lesion logits on that stage's grid (``forward(x, with_mask=True)``),
    an auxiliary target during training only; ``features`` and the logits do not depend on it.
    """

    def __init__(
        self,
        n_classes: int,
        width: int = 32,
        depth: tuple[int, ...] | list[int] = (1, 1, 1, 1),
        dropout: float = 0.2,
        in_channels: int = 1,
        stem_kernel: int = 5,
        stem_pool: bool = True,
        mask_head: bool = False,
    ) -> None:
        super().__init__()
        if len(depth) == 0 or any(d < 1 for d in depth):
            raise ConfigError(f"classifier.depth must list positive block counts, got {list(depth)}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, stem_kernel, stride=2, padding=stem_kernel // 2, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2) if stem_pool else nn.Identity(),
        )
        stages: list[nn.Module] = []
        in_ch = width
        for i, n_blocks in enumerate(depth):
            out_ch = width * 2**i
            blocks = [BasicBlock(in_ch, out_ch, stride=1 if i == 0 else 2)]
            blocks += [BasicBlock(out_ch, out_ch) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(in_ch, n_classes)
        self.feature_dim = in_ch
        # The auxiliary lesion-mask head reads the penultimate stage (the only one of a one-stage network).
        self._mask_stage = max(0, len(depth) - 2)
        self.mask_head = nn.Conv2d(width * 2**self._mask_stage, 1, 1) if mask_head else None
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)  # each block starts as the identity (Goyal et al. 2017)
        if self.mask_head is not None:  # starts at p = 0.5 everywhere, not at Kaiming-sized logits
            nn.init.zeros_(self.mask_head.weight)
            nn.init.zeros_(self.mask_head.bias)

    def _forward_stages(self, x: torch.Tensor, with_mask: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pooled features (N, feature_dim) and, when asked for, the mask head's lesion logits (N, 1, h, w)."""
        x = self.stem((x - 0.5) / 0.25)
        mask_logits = None
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if with_mask and i == self._mask_stage:
                if self.mask_head is None:
                    raise ValueError("this classifier was built without a mask head (classifier.mask_weight = 0)")
                mask_logits = self.mask_head(x)
        return torch.flatten(self.pool(x), 1), mask_logits

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, feature_dim): globally pooled output of the last stage."""
        return self._forward_stages(x)[0]

    def forward(self, x: torch.Tensor, with_mask: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, n_classes) for images (N, 1, S, S) in [0, 1]; with ``with_mask`` also the mask
        head's lesion logits (N, 1, h, w) on the penultimate stage's grid (needs ``mask_head``)."""
        features, mask_logits = self._forward_stages(x, with_mask)
        logits = self.head(self.dropout(features))
        return (logits, mask_logits) if with_mask else logits


class BackboneClassifier(nn.Module):
    """An external backbone returning pooled features (N, D), plus dropout and a linear head."""

    def __init__(self, backbone: nn.Module, feature_dim: int, n_classes: int, dropout: float,
                 mean: float, std: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, n_classes)
        self.feature_dim = feature_dim
        self.mean, self.std = mean, std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, feature_dim) of images (N, 1, S, S) in [0, 1]."""
        return torch.flatten(self.backbone((x - self.mean) / self.std), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, n_classes)."""
        return self.head(self.dropout(self.features(x)))


@contextmanager
def _bounded_network(timeout_s: float = WEIGHTS_TIMEOUT_S) -> Iterator[None]:
    """Make every socket opened inside time out after ``timeout_s`` (no download can hang)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _import_library(name: str, arch: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ConfigError(
            f"classifier.arch={arch!r} needs the '{name}' package, which is not installed: "
            f"`pip install {name}` (or use classifier.arch=resnet)"
        ) from None


def _weights_error(arch: str, exc: BaseException) -> ConfigError:
    return ConfigError(
        f"classifier.arch={arch!r} with classifier.pretrained=true: could not load ImageNet "
        f"weights ({type(exc).__name__}: {exc}). Put the weights in the library's cache while "
        "online, or set classifier.pretrained=false."
    )


def _build_timm(name: str, cfg: ClassifierConfig, n_classes: int, load_weights: bool) -> nn.Module:
    timm = _import_library("timm", cfg.arch)
    try:
        with _bounded_network():
            backbone = timm.create_model(name, pretrained=cfg.pretrained and load_weights, in_chans=1, num_classes=0)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ConfigError(f"classifier.arch={cfg.arch!r}: timm has no model '{name}'") from None
        if cfg.pretrained:
            raise _weights_error(cfg.arch, exc) from exc
        raise
    except (OSError, ValueError) as exc:  # network errors, timeouts, missing hub files
        if cfg.pretrained:
            raise _weights_error(cfg.arch, exc) from exc
        raise ConfigError(f"classifier.arch={cfg.arch!r}: timm could not build it ({exc})") from exc
    mean, std = (IMAGENET_GREY_MEAN, IMAGENET_GREY_STD) if cfg.pretrained else (0.5, 0.25)
    return BackboneClassifier(backbone, int(backbone.num_features), n_classes, cfg.dropout, mean, std)


def _replace_first_conv_with_grey(model: nn.Module) -> None:
    """Swap the first 3-channel Conv2d for a 1-channel one whose kernel is the RGB sum."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                grey = nn.Conv2d(1, child.out_channels, child.kernel_size, child.stride, child.padding,
                                 child.dilation, bias=child.bias is not None)
                with torch.no_grad():
                    grey.weight.copy_(child.weight.sum(dim=1, keepdim=True))
                    if child.bias is not None:
                        grey.bias.copy_(child.bias)
                setattr(parent, child_name, grey)
                return
    raise ConfigError("classifier.arch: found no 3-channel Conv2d to adapt to grey images")


def _strip_last_linear(model: nn.Module) -> int:
    """Replace the model's last nn.Linear (its head) with Identity; return its in_features."""
    last: tuple[nn.Module, str, nn.Linear] | None = None
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                last = (parent, child_name, child)
    if last is None:
        raise ConfigError("classifier.arch: the torchvision model has no linear head to replace")
    parent, child_name, linear = last
    setattr(parent, child_name, nn.Identity())
    return int(linear.in_features)


def _build_torchvision(name: str, cfg: ClassifierConfig, n_classes: int, load_weights: bool) -> nn.Module:
    tv_models = _import_library("torchvision", cfg.arch).models
    if name not in tv_models.list_models():
        raise ConfigError(f"classifier.arch={cfg.arch!r}: torchvision has no model '{name}'")
    try:
        with _bounded_network():
            backbone = tv_models.get_model(name, weights="DEFAULT" if cfg.pretrained and load_weights else None)
    except Exception as exc:  # urllib / hash / file errors all mean: weights unavailable
        if cfg.pretrained:
            raise _weights_error(cfg.arch, exc) from exc
        raise ConfigError(f"classifier.arch={cfg.arch!r}: torchvision could not build it ({exc})") from exc
    _replace_first_conv_with_grey(backbone)
    feature_dim = _strip_last_linear(backbone)
    mean, std = (IMAGENET_GREY_MEAN, IMAGENET_GREY_STD) if cfg.pretrained else (0.5, 0.25)
    return BackboneClassifier(backbone, feature_dim, n_classes, cfg.dropout, mean, std)


def load_hf_backbone(source: str, pretrained: bool, what: str, all_stages: bool = True) -> nn.Module:
    """The backbone of the transformers vision model at ``source`` (hub id or folder: ResNet, ConvNeXt,
    Swin, ...), returning the feature maps of all its stages (or of the last alone, so that no
    per-stage layer goes unused): its saved weights (``pretrained``, from safetensors) or the same
    architecture with fresh ones (to receive a trained model's weights). Raises ConfigError naming
    the setting ``what``."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING

    config = from_pretrained(AutoConfig, source, what=what, error=ConfigError, weights=False)
    if type(config) not in MODEL_FOR_BACKBONE_MAPPING:
        raise ConfigError(f"{what} {source}: transformers has no backbone for a {config.model_type!r} model "
                          "(use a vision model such as ResNet or ConvNeXt)")
    # The model type's own backbone class: AutoBackbone.from_pretrained asks the hub whether a local
    # folder is a repository (transformers 5.25) and fails offline.
    cls: Any = MODEL_FOR_BACKBONE_MAPPING[type(config)]
    config.out_features = list(config.stage_names[1:] if all_stages else config.stage_names[-1:])  # no stem
    if not pretrained:
        return cls(config)
    logger.info("loading the backbone of %s from %s", what, source)
    return from_pretrained(cls, source, what=what, error=ConfigError, config=config)


class PooledStages(nn.Module):
    """A transformers backbone (its last stage's feature map) as a feature extractor: grey images
    repeated over its input channels, the map averaged over space, (N, C)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.in_channels = int(backbone.config.num_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S) normalised images -> (N, C) features."""
        return self.backbone(x.expand(-1, self.in_channels, -1, -1)).feature_maps[-1].mean(dim=(2, 3))


def _build_hf(source: str, cfg: ClassifierConfig, n_classes: int, load_weights: bool) -> nn.Module:
    backbone = load_hf_backbone(source, cfg.pretrained and load_weights, "classifier.arch", all_stages=False)
    mean, std = (IMAGENET_GREY_MEAN, IMAGENET_GREY_STD) if cfg.pretrained else (0.5, 0.25)
    return BackboneClassifier(PooledStages(backbone), int(backbone.channels[-1]), n_classes, cfg.dropout, mean, std)


def build_classifier(cfg: ClassifierConfig, n_classes: int, load_weights: bool = True) -> nn.Module:
    """The classifier ``cfg.arch`` names, for 1-channel images and ``n_classes`` outputs.

    ``"resnet"`` is the built-in :class:`CompactResNet`; ``"hf:<hub id or folder>"`` the backbone
    of a transformers vision model (its last stage pooled); ``"timm:<name>"`` and
    ``"torchvision:<name>"`` build that library's model when it is installed. With
    ``classifier.pretrained`` the weights are the library's (``load_weights``; False builds the
    architecture to receive a trained classifier's) and images are normalised with ImageNet's
    statistics either way. The returned module has ``forward(x) -> logits``,
    ``features(x) -> (N, D)`` and ``feature_dim``. Raises ConfigError for unknown architectures,
    a missing library, or pretrained weights that cannot be fetched.
    """
    if n_classes < 2:
        raise ConfigError(f"a classifier needs at least 2 classes, got {n_classes}")
    arch = cfg.arch.strip()
    if arch == "resnet":
        if cfg.pretrained:
            raise ConfigError("classifier.pretrained=true needs an hf:, timm: or torchvision: classifier.arch")
        return CompactResNet(n_classes, width=cfg.width, depth=cfg.depth, dropout=cfg.dropout,
                             mask_head=cfg.mask_weight > 0)
    library, _, name = arch.partition(":")
    if library == "hf" and name:
        return _build_hf(name, cfg, n_classes, load_weights)
    if library == "timm" and name:
        return _build_timm(name, cfg, n_classes, load_weights)
    if library == "torchvision" and name:
        return _build_torchvision(name, cfg, n_classes, load_weights)
    raise ConfigError(
        f"classifier.arch={cfg.arch!r} is unknown: use 'resnet', 'hf:<hub id or folder>', 'timm:<model>' or "
        "'torchvision:<model>'"
    )
