"""Typed configuration: one pydantic model per concern, with the defaults that run on a CPU.

``busynth.presets`` reads a preset or user YAML file and dotted overrides into a
:class:`StudyConfig`. Unknown fields are errors, so a typo in a config file never passes
silently.
"""

from __future__ import annotations

import logging
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from busynth.io import fit_key, resolve_model_source
from busynth.registry import available_methods, makes_masks, order_methods, unknown_methods

log = logging.getLogger(__name__)

DEFAULT_CLASSES = ("normal", "benign", "malignant")
# Narrowest built-in ResNet trained in channels-last layout (see ClassifierConfig).
MIN_CHANNELS_LAST_WIDTH = 8


def _false_is_no(value: Any) -> Any:
    """YAML 1.1 reads an unquoted ``no`` (``mixed_precision: no``, ``--set ...=no``) as False."""
    return "no" if value is False else value


# Precision of a training loop (accelerate's mixed_precision) and of sampling.
MixedPrecision = Annotated[Literal["no", "bf16", "fp16"], BeforeValidator(_false_is_no)]
SamplingPrecision = Annotated[Literal["no", "bf16"], BeforeValidator(_false_is_no)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def is_plain_name(name: str) -> bool:
    """True for a single, non-empty folder or file name (no separators, not ``.`` or ``..``)."""
    return bool(name) and name not in (".", "..") and not any(sep in name for sep in ("/", "\\", "\0"))


def positive_range(value: tuple[float, float], what: str = "range") -> tuple[float, float]:
    """Check a (low, high) range of positive factors with low <= high; returns it."""
    low, high = value
    if not 0 < low <= high:
        raise ValueError(f"{what} must be (low, high) with 0 < low <= high, got {tuple(value)}")
    return value


class DataConfig(_Strict):
    """How a data set folder is read."""

    classes: list[str] = Field(default_factory=lambda: list(DEFAULT_CLASSES))
    # Classes whose images carry no lesion: their masks are empty and no mask file is needed.
    normal_classes: list[str] = Field(default_factory=lambda: ["normal"])
    # What to do with an image of a lesion class that has no mask file:
    # "warn" keeps it with mask=None and says so, "refuse" stops with an error.
    missing_mask: Literal["warn", "refuse"] = "warn"
    # Images with more pixels than this are refused (decompression-bomb guard).
    max_pixels: int = Field(default=40_000_000, gt=0)
    # Unreadable or non-image files: "refuse" stops, "skip" leaves them out and reports them.
    on_bad_file: Literal["refuse", "skip"] = "refuse"

    @field_validator("classes")
    @classmethod
    def _classes_unique(cls, v: list[str]) -> list[str]:
        if len(v) < 2:
            raise ValueError("need at least two classes")
        if len(set(v)) != len(v):
            raise ValueError(f"class names must be unique, got {v}")
        bad = [c for c in v if not is_plain_name(c)]
        if bad:
            raise ValueError(f"class names are folder names: no '/', '\\', '..' or empty names, got {bad}")
        return v


class PhantomConfig(_Strict):
    """The built-in simulated data set (used when no --data is given)."""

    n_per_class: dict[str, int] = Field(
        default_factory=lambda: {"normal": 40, "benign": 80, "malignant": 60}
    )
    size: int = Field(default=128, ge=16)
    seed: int = 0
    # Share of images that get a near-duplicate twin (to exercise the audit and grouped splits).
    near_duplicate_rate: float = Field(default=0.05, ge=0.0, le=0.5)
    # The simulated scanner (busynth.data.phantom.SCANNERS): "second" renders the same anatomy as
    # another scanner would (speckle, gain, attenuation, TGC), e.g. for an external test set.
    scanner: Literal["default", "second"] = "default"

    @field_validator("n_per_class")
    @classmethod
    def _positive_counts(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: n for k, n in v.items() if n <= 0}
        if bad:
            raise ValueError(f"counts must be positive, got {bad}")
        return v


class AuditConfig(_Strict):
    """Duplicate and overlay detection."""

    hash_size: int = Field(default=8, ge=4, le=32)
    # Maximum Hamming distance of both pHash and dHash (hash_size**2 bits each) for a near duplicate;
    # on BUSI, pairs up to 12 apart were all the same scan when inspected by eye.
    near_duplicate_distance: int = Field(default=10, ge=0)
    # Pixels whose channels differ by more than this count as coloured (0..255).
    overlay_channel_delta: int = Field(default=20, ge=1, le=255)
    # An image is flagged as overlaid when at least this share of its pixels is coloured.
    overlay_min_fraction: float = Field(default=0.0001, gt=0.0, le=1.0)


class SplitConfig(_Strict):
    """Stratified group k-fold (or holdout) with a validation part carved from train."""

    mode: Literal["kfold", "holdout"] = "kfold"
    folds: int = Field(default=3, ge=2)
    # Repeated cross-validation: this many fold assignments, each with its own seed (split.seed + r).
    repeats: int = Field(default=1, ge=1)
    # Holdout: share of the data in the test part.
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    # Share of each training part moved to validation (grouped, stratified).
    val_fraction: float = Field(default=0.15, gt=0.0, lt=0.5)
    seed: int = 0
    # Cross-class duplicates (same image under two labels) are excluded unless this is false.
    exclude_cross_class: bool = True
    # A split file (--split-file) whose duplicate groups straddle test and train/val: "refuse" stops
    # before any training naming the groups; "purge" drops their train/val members (the test part
    # stays as given); "keep" runs it as given and marks the results "leaky split".
    on_leak: Literal["refuse", "purge", "keep"] = "refuse"


class ClassifierConfig(_Strict):
    """The CNN trained on real (+ synthetic) images and scored on real test images."""

    # "resnet" (built in), "hf:<hub id or folder>" (a transformers vision model's backbone, its last
    # stage pooled), or "timm:<name>" / "torchvision:<name>" when installed.
    arch: str = "resnet"
    pretrained: bool = False  # the library's weights (hf: the folder's or hub's) and ImageNet normalisation
    image_size: int = Field(default=128, ge=16)
    width: int = Field(default=32, ge=4)
    depth: list[int] = Field(default_factory=lambda: [1, 1, 1, 1], min_length=1)
    dropout: float = Field(default=0.2, ge=0.0, lt=1.0)
    epochs: int = Field(default=20, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=2e-3, gt=0.0)
    weight_decay: float = Field(default=0.05, ge=0.0)
    warmup_epochs: float = Field(default=1.0, ge=0.0)
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    class_weights: Literal["none", "balanced"] = "balanced"
    # On-the-fly augmentation of every training image, all methods alike: none, flips only,
    # "light" (flip, rotation ±10°, scale 0.9-1.1, shift 5%, gamma and contrast; data/augment.py) or
    # "strong" (rotation ±15°, scale 0.75-1.33, shift 10%, wider gamma and contrast, speckle noise).
    augment: Literal["none", "flip", "light", "strong"] = "light"
    # Test-time augmentation: average the predictions for each image and its mirror.
    tta: bool = True
    # Model selection: "best" keeps the epoch with the best select_metric on the real validation
    # part (early stopping after `patience` epochs without improvement); "last" trains the whole
    # budget and keeps the final weights (with ema_epochs > 0: their moving average).
    select: Literal["best", "last"] = "best"
    select_metric: Literal["balanced_accuracy", "macro_auc", "loss"] = "macro_auc"
    patience: int = Field(default=6, ge=1)
    # Exponential moving average of the weights over about this many epochs (0: off); the average
    # is what validation scores and what is kept (torch.optim.swa_utils.AveragedModel).
    ema_epochs: float = Field(default=0.0, ge=0.0)
    # Mixup (Zhang et al. 2018) with Beta(alpha, alpha) weights; 0: off.
    mixup_alpha: float = Field(default=0.0, ge=0.0)
    # Weight of an auxiliary lesion-mask loss (0: off): a 1x1-conv head on the penultimate stage predicts
    # the share of lesion in each cell of its grid, trained with binary cross-entropy on the training
    # images that have a mask (real ones; synthetic ones of generators that write masks). Multi-task
    # deep supervision from the masks BUSI ships with; only the built-in resnet has the head.
    mask_weight: float = Field(default=0.0, ge=0.0)
    # The training budget is counted on the real training images (an epoch = one pass over them),
    # for every method alike. Batches are drawn from real + synthetic images: uniformly from their
    # union (null), or with this share of every batch synthetic.
    synthetic_share: float | None = Field(default=None, ge=0.0, lt=1.0)
    grad_accum: int = Field(default=1, ge=1)
    # bf16 autocast (accelerate): on a CPU with AVX-512 BF16 a training step takes ~0.5-0.6x the
    # time of fp32 at 96 px (bench/bench_speed.py; measured only on this CPU). Changes the numbers.
    mixed_precision: MixedPrecision = "no"
    # Keep the model's weights and activations in channels_last (NHWC) memory layout: ~0.8x the
    # epoch time of NCHW on this CPU (bench/bench_speed.py), the same results up to rounding.
    channels_last: bool = False
    # Score the validation part every this many epochs (and after the last). With select=last it only
    # feeds the training curves, so scoring less often saves time and changes no result.
    eval_every: int = Field(default=1, ge=1)
    # Write the resumable checkpoint (the engine's checkpoint-N/ folder and history.csv) every this
    # many epochs and after the last; a killed run replays the epochs since, with the same result.
    checkpoint_every: int = Field(default=1, ge=1)

    @field_validator("depth")
    @classmethod
    def _positive_depth(cls, v: list[int]) -> list[int]:
        if any(d < 1 for d in v):
            raise ValueError(f"every stage needs at least one block, got {v}")
        return v

    @field_validator("arch")
    @classmethod
    def _hf_source_is_a_model(cls, v: str) -> str:
        library, _, source = v.strip().partition(":")
        return f"hf:{resolve_model_source(source)}" if library == "hf" and source else v

    @model_validator(mode="after")
    def _best_needs_every_epoch(self) -> ClassifierConfig:
        if self.select == "best" and self.eval_every != 1:
            raise ValueError("eval_every > 1 needs select=last (select=best scores every epoch to pick one)")
        return self

    @model_validator(mode="after")
    def _mask_head_needs_builtin(self) -> ClassifierConfig:
        if self.mask_weight > 0 and self.arch != "resnet":
            raise ValueError(f"mask_weight > 0 needs arch=resnet (the built-in network has the mask head), "
                             f"got arch={self.arch!r}")
        return self

    @model_validator(mode="after")
    def _channels_last_needs_width(self) -> ClassifierConfig:
        # torch 2.13's NHWC CPU kernels corrupted the heap ("corrupted double-linked list", then an
        # abort) when training the built-in ResNet at widths 4-6 on an AVX2 CPU; widths >= 7 trained.
        if self.channels_last and self.arch == "resnet" and self.width < MIN_CHANNELS_LAST_WIDTH:
            raise ValueError(f"channels_last needs width >= {MIN_CHANNELS_LAST_WIDTH} (got {self.width}): torch's "
                             "channels-last CPU kernels crash on narrower layers; set channels_last=false")
        return self


class SynthesisConfig(_Strict):
    """How many synthetic images a method adds per class."""

    # Extra images per class = ratio x real training count of that class.
    ratio: float = Field(default=1.0, gt=0.0)
    # Top minority classes up to the majority count instead of using ratio.
    balance: bool = False
    # Dose-response: run every generator method as one arm per ratio (``cvae@0.5``, ...) instead of
    # at ``ratio``; each fold's set is sampled once at the largest and every arm takes its prefix.
    ratios: list[float] | None = None
    # Filtering: also run every generator as ``<method>+filter``, keeping a synthetic image only when the
    # fold's real-only classifier gives its intended class at least this probability; ``filter_pool``
    # images are sampled per image requested, and the first that pass are kept.
    filter: float | None = Field(default=None, gt=0.0, lt=1.0)
    filter_pool: float = Field(default=3.0, ge=1.0)

    @field_validator("ratios")
    @classmethod
    def _ratios_positive_distinct(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or min(v) <= 0 or len(set(v)) != len(v)):
            raise ValueError(f"synthesis.ratios must be distinct numbers > 0, got {v}")
        return sorted(v) if v is not None else None

    @model_validator(mode="after")
    def _ratios_need_counts(self) -> SynthesisConfig:
        if self.ratios is not None and self.balance:
            raise ValueError("synthesis.ratios and synthesis.balance exclude each other")
        if self.ratios is not None and self.filter is not None:
            raise ValueError("synthesis.ratios and synthesis.filter are not combined yet: run them as two studies")
        return self


class RunConfig(_Strict):
    """The study: which methods, how many seeds, where results go."""

    methods: list[str] = Field(default_factory=lambda: ["real", "classical"])
    # Classifier training seeds per fold, shared by all methods (paired by seed).
    seeds: int = Field(default=1, ge=1)
    # Generator fits per fold and method; each synthetic set is reused by the classifier seeds
    # i with i mod generator_seeds equal to its index (at most `seeds`).
    generator_seeds: int = Field(default=1, ge=1)
    # Run only the cells of these folds (None: all), e.g. to share one study between processes or
    # machines on one run folder (each fold in one process); every invocation summarises what is done.
    only_folds: list[int] | None = None
    base_seed: int = 0
    bootstrap: int = Field(default=2000, ge=100)
    # The metric verdicts are decided on (Holm-adjusted across the methods compared).
    # "classification" (normal / benign / malignant) or "segmentation" (the lesion mask of the lesion
    # classes; methods that produce masks only, verdicts on Dice).
    task: Literal["classification", "segmentation"] = "classification"
    primary_metric: Literal[
        "accuracy", "balanced_accuracy", "macro_f1", "macro_auc",
        "malignant_sensitivity", "malignant_specificity", "malignant_auc", "dice", "iou",
    ] = "balanced_accuracy"
    # Paired interval of method - reference: "components" splits the variance into its test-image and
    # training-seed parts (2+ seeds per fold; with one, the bootstrap is used); "bootstrap" resamples
    # classifier seeds within each fold and test images (drawn once, shared by seeds and methods);
    # "corrected_t" is the corrected resampled t-test (Nadeau & Bengio 2003). Chosen by
    # bench/bench_calibration.py (README, "How methods are compared").
    interval: Literal["bootstrap", "components", "corrected_t"] = "components"
    # Family-wise error rate of the verdicts (and 1 - coverage of the intervals).
    alpha: float = Field(default=0.05, gt=0.0, lt=0.5)
    # An external set that lacks some of the study's classes (BUS-BRA: benign and malignant, no normal)
    # is scored among the classes it has ("present": each image's probabilities renormalised over them,
    # the question "benign or malignant?" that set asks; the share of its images the classifier puts in
    # an absent class is reported beside) or among all classes ("all": an image called normal is wrong).
    external_classes: Literal["present", "all"] = "present"
    tracker: Literal["none", "wandb", "tensorboard"] = "none"
    # Train on synthetic, test on real (CAS, Ravuri & Vinyals 2019): one more classifier per generator
    # fit, on its synthetic images alone, scored on the real test part (cells/<method>/<cell>/cas.json).
    cas: bool = False
    # Who computes the cells: this process ("local") or a Ray cluster ("ray", busynth.executors). Any
    # number of workers may share one run folder: every unit of work is claimed (busynth.locks).
    executor: Literal["local", "ray"] = "local"
    # Ray: the cluster to connect to ("auto", "ray://host:10001"); None starts a local Ray instance
    # with `workers` x `cell_cpus` CPUs (workers None: as many as this machine's cores allow).
    ray_address: str | None = None
    workers: int | None = Field(default=None, ge=1)
    # Resources each Ray task (a cell, a generator fit, a synthetic set's scoring) asks for.
    cell_cpus: int = Field(default=1, ge=1)
    cell_gpus: float = Field(default=0.0, ge=0.0)

    @field_validator("methods")
    @classmethod
    def _methods_nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("need at least one method")
        if len(set(v)) != len(v):
            raise ValueError(f"methods repeat: {v}")
        unknown = unknown_methods(v)
        if unknown:
            raise ValueError(f"unknown method {', '.join(map(repr, unknown))}; "
                             f"available: {', '.join(available_methods())}")
        # A method runs after those it builds on (controlnet after sd-lora), else in the order given.
        ordered = order_methods(v)
        if ordered != v:
            log.info("run.methods reordered so that each method runs after those it builds on: %s",
                     ", ".join(ordered))
        return ordered


    @model_validator(mode="after")
    def _task_metrics_and_methods(self) -> RunConfig:
        segmentation = self.task == "segmentation"
        if segmentation and self.primary_metric == "balanced_accuracy":  # the classification default
            self.primary_metric = "dice"
        if segmentation != (self.primary_metric in ("dice", "iou")):
            raise ValueError(f"run.primary_metric {self.primary_metric!r} is not a metric of run.task {self.task!r}")
        if segmentation and (no_masks := [m for m in self.methods if not makes_masks(m)]):
            raise ValueError(f"run.task=segmentation needs image-mask pairs: {', '.join(no_masks)} make no masks "
                             "(use real, classical, controlnet)")
        return self

    @model_validator(mode="after")
    def _generator_seeds_fit(self) -> RunConfig:
        if self.generator_seeds > self.seeds:
            raise ValueError(f"generator_seeds ({self.generator_seeds}) cannot exceed seeds ({self.seeds}): "
                             "every generator fit needs a classifier seed")
        return self


class SegmenterConfig(_Strict):
    """The model of ``run.task=segmentation``: MONAI's 2-D UNet (residual units) predicting the lesion
    mask, trained on the engine with Dice + cross-entropy for a fixed budget counted, like the
    classifier's, on the real training pairs (an epoch = one pass over them)."""

    image_size: int = Field(default=96, ge=16)
    channels: list[int] = Field(default_factory=lambda: [16, 32, 64, 128], min_length=2)
    strides: list[int] = Field(default_factory=lambda: [2, 2, 2], min_length=1)
    # unet: MONAI's UNet (residual units); attention_unet: MONAI's AttentionUnet (Oktay et al. 2018:
    # attention gates on the skip connections; num_res_units has no effect); dynunet: MONAI's DynUNet, the
    # nnU-Net layout (Isensee et al. 2021: two 3x3 convolutions per level, leaky ReLU, transposed-conv
    # upsampling; residual blocks when num_res_units > 0) with optional deep supervision; backbone_unet:
    # the pretrained image backbone segmenter.backbone as the encoder (transformers), MONAI's U-Net
    # decoder on its stages, whose widths are segmenter.channels read from the last (strides unused).
    arch: Literal["unet", "attention_unet", "dynunet", "backbone_unet"] = "unet"
    # backbone_unet only: a transformers vision model with a backbone (ResNet, ConvNeXt, ...), as a hub
    # id ("microsoft/resnet-34") or a local folder of save_pretrained, weights read from safetensors.
    backbone: str | None = None
    # dynunet only: this many extra lesion heads on the decoder's coarser levels, each trained on the
    # same loss at weights 1/2, 1/4, ... of the main head's (MONAI's DeepSupervisionLoss); test
    # predictions use the main head alone.
    deep_supervision: int = Field(default=0, ge=0)
    # Normalisation of the feature maps: instance (each image by itself, MONAI's UNet default) or
    # batch (MONAI's AttentionUnet default).
    norm: Literal["instance", "batch"] = "instance"
    num_res_units: int = Field(default=1, ge=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    epochs: int = Field(default=40, ge=1)
    batch_size: int = Field(default=16, ge=1)
    lr: float = Field(default=2e-3, gt=0.0)
    weight_decay: float = Field(default=1e-4, ge=0.0)
    warmup_epochs: float = Field(default=1.0, ge=0.0)
    # Moving average of the weights over this many epochs (0: the trained weights are kept).
    ema_epochs: float = Field(default=0.0, ge=0.0)
    augment: Literal["none", "light", "strong"] = "light"  # the classifier's warp (image and mask alike) and jitter
    synthetic_share: float | None = Field(default=None, ge=0.0, lt=1.0)
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0)  # on the sigmoid of the logits
    # Test-time augmentation: average the lesion probability of each image and its mirror.
    tta: bool = False
    # The fold's validation pairs: "monitor" scores the kept weights on them every eval_every epochs
    # (a learning curve; the last weights are kept either way), "train" adds them to the real training
    # pairs (and to the budget) and draws no curve, as nnU-Net's final models train on every training case.
    validation: Literal["monitor", "train"] = "monitor"
    eval_every: int = Field(default=5, ge=1)
    checkpoint_every: int = Field(default=5, ge=1)
    mixed_precision: MixedPrecision = "no"

    @field_validator("backbone")
    @classmethod
    def _backbone_is_a_model(cls, v: str | None) -> str | None:
        return v if v is None else resolve_model_source(v)

    @model_validator(mode="after")
    def _settings_fit_the_arch(self) -> SegmenterConfig:
        if (self.arch == "backbone_unet") != (self.backbone is not None):
            raise ValueError("segmenter.arch=backbone_unet needs segmenter.backbone (a hub id or a model folder)"
                             if self.backbone is None else
                             f"segmenter.backbone needs segmenter.arch=backbone_unet, got arch={self.arch}")
        if self.arch in ("attention_unet", "backbone_unet") and self.num_res_units != 1:  # 1: the default
            raise ValueError(f"segmenter.num_res_units={self.num_res_units} has no effect with "
                             f"segmenter.arch={self.arch}; use unet or dynunet")
        if self.deep_supervision and self.arch != "dynunet":
            raise ValueError(f"segmenter.deep_supervision needs segmenter.arch=dynunet, got arch={self.arch}")
        if self.arch == "backbone_unet":
            return self  # the backbone's stages set the strides (checked when it is built)
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(f"segmenter.strides needs len(channels) - 1 = {len(self.channels) - 1} entries, "
                             f"got {len(self.strides)}")
        if self.deep_supervision > len(self.strides) - 1:
            raise ValueError(f"segmenter.deep_supervision can be at most len(strides) - 1 = {len(self.strides) - 1} "
                             f"(heads on levels above the bottleneck), got {self.deep_supervision}")
        if self.image_size % math.prod(self.strides):
            raise ValueError(f"segmenter.image_size {self.image_size} must be divisible by the product of "
                             f"segmenter.strides ({math.prod(self.strides)})")
        return self


class StudyConfig(_Strict):
    """Everything one run of the study needs; saved resolved in the run folder."""

    data: DataConfig = Field(default_factory=DataConfig)
    phantom: PhantomConfig = Field(default_factory=PhantomConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    segmenter: SegmenterConfig = Field(default_factory=SegmenterConfig)
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    # Free-form per-generator settings, validated by each generator's own config model.
    generators: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _classical_moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "classical" in data:
            raise ValueError("the top-level 'classical' section moved to 'generators.classical' "
                             "(like every other method's settings): move it there")
        return data

    @model_validator(mode="after")
    def _filter_needs_the_reference(self) -> StudyConfig:
        if self.synthesis.filter is not None and ("real" not in self.run.methods or self.run.task != "classification"):
            raise ValueError("synthesis.filter needs run.methods to include real (its classifier does the filtering) "
                             "and run.task=classification")
        return self

    @model_validator(mode="after")
    def _phantom_classes_known(self) -> StudyConfig:
        unknown = set(self.phantom.n_per_class) - set(self.data.classes)
        if unknown:
            raise ValueError(f"phantom.n_per_class names classes not in data.classes: {sorted(unknown)}")
        return self

    def fingerprint(self, *parts: str) -> str:
        """A short hash of the given top-level sections (all when none), for cache keys."""
        dump = self.model_dump(mode="json")
        return fit_key({k: dump[k] for k in (parts or dump.keys())})
