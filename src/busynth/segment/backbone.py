"""``segmenter.arch=backbone_unet``: a U-Net whose encoder is a pretrained image backbone.

The encoder is any transformers vision model with a backbone class (ResNet, ConvNeXt, Swin, ...:
``transformers.MODEL_FOR_BACKBONE_MAPPING``), loaded with ``from_pretrained`` from a hub id or a
local folder (safetensors only) and asked for the feature maps of all its stages. The decoder and
the head are MONAI's: ``UNetDecoder`` and ``SegmentationHead``, the parts of its ``FlexibleUNet``
(which builds them on its own registry of encoders: EfficientNet and ResNet, weights fetched by URL).
The backbone is loaded as ``classifier.arch=hf:<source>`` loads the classifier's
(:func:`busynth.classify.models.load_hf_backbone`).
Grey images are repeated over the backbone's input channels and normalised with ImageNet's grey-level
statistics, as the classifier's pretrained models are.

A skip connection per stage but the deepest; the decoder doubles the resolution at every level, so the
stages must halve it one after another (strides s, 2s, 4s, ...). The decoder ends at stride s / 2
(a ResNet's first stage is at stride 4) and the head upsamples the rest of the way.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn

from busynth.classify.models import IMAGENET_GREY_MEAN, IMAGENET_GREY_STD, load_hf_backbone
from busynth.config import SegmenterConfig
from busynth.errors import ConfigError


class BackboneUNet(nn.Module):
    """Backbone stages -> MONAI's U-Net decoder -> one lesion logit per pixel."""

    def __init__(self, backbone: nn.Module, decoder_channels: list[int], image_size: int, norm: str,
                 dropout: float) -> None:
        from monai.networks.nets.flexible_unet import SegmentationHead, UNetDecoder

        super().__init__()
        self.backbone = backbone
        self.in_channels = int(backbone.config.num_channels)
        strides = self._strides(image_size)
        source = getattr(backbone.config, "_name_or_path", "") or type(backbone).__name__
        if any(b != 2 * a for a, b in pairwise(strides)) or strides[0] < 2:
            raise ConfigError(f"segmenter.backbone={source!r}: its stages are at strides {strides} of a "
                              f"{image_size} px image; a U-Net decoder needs each stage at half the resolution "
                              "of the one before")
        if len(decoder_channels) < len(strides):
            raise ConfigError(f"segmenter.channels needs at least {len(strides)} entries for the decoder on "
                              f"{source!r}'s {len(strides)} stages, got {len(decoder_channels)}")
        widths = decoder_channels[::-1][:len(strides)]  # coarsest level first
        self.decoder = UNetDecoder(spatial_dims=2, encoder_channels=[self.in_channels, *backbone.channels],
                                   decoder_channels=widths, act=("relu", {"inplace": True}), norm=norm,
                                   dropout=dropout, bias=False, upsample="nontrainable", pre_conv="default",
                                   interp_mode="nearest", align_corners=None, is_pad=True)
        self.skips = len(strides) - 1
        self.head = SegmentationHead(spatial_dims=2, in_channels=widths[-1], out_channels=1, kernel_size=3,
                                     scale_factor=strides[0] / 2)

    @torch.no_grad()
    def _strides(self, image_size: int) -> list[int]:
        was_training = self.backbone.training
        self.backbone.eval()
        maps = self.backbone(torch.zeros(1, self.in_channels, image_size, image_size)).feature_maps
        self.backbone.train(was_training)
        return [round(image_size / m.shape[-1]) for m in maps]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S) grey images in [0, 1] -> (N, 1, S, S) lesion logits."""
        x = ((x - IMAGENET_GREY_MEAN) / IMAGENET_GREY_STD).expand(-1, self.in_channels, -1, -1)
        maps = list(self.backbone(x).feature_maps)
        # UNetDecoder takes the input's features first (never used as a skip), then the stages.
        return self.head(self.decoder([x, *maps], self.skips))


def build_backbone_unet(cfg: SegmenterConfig, pretrained: bool = True) -> BackboneUNet:
    """:class:`BackboneUNet` on ``cfg.backbone`` (its pretrained weights unless ``pretrained`` is False)."""
    assert cfg.backbone is not None  # the config requires it with arch=backbone_unet
    return BackboneUNet(load_hf_backbone(cfg.backbone, pretrained, "segmenter.backbone"),
                        list(cfg.channels), cfg.image_size, cfg.norm, cfg.dropout)
