"""Segmentation as the study's second task: MONAI scores, a UNet that learns, and a whole study."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.tiny import tiny_resnet
from safetensors.torch import load_file
from scipy.special import expit
from typer.testing import CliRunner

from busynth.classify.metrics import SCORE_NAMES, weighted_metric
from busynth.cli import app
from busynth.config import PhantomConfig, SegmenterConfig
from busynth.data.busi import write_busi_layout
from busynth.data.phantom import make_phantom
from busynth.data.records import lesion_pairs
from busynth.data.transforms import stack_images, stack_masks
from busynth.engine import _what_was_trained
from busynth.errors import ConfigError, RunStateError
from busynth.io import fit_key
from busynth.presets import load_config
from busynth.segment.metrics import segmentation_scores
from busynth.segment.train import (
    SegmenterFit,
    SegmenterStage,
    build_segmenter,
    fit_segmenter,
    load_segmenter,
    predict_masks,
)

runner = CliRunner()


def test_dice_iou_hd95_pinned_on_a_hand_made_case() -> None:
    true = np.zeros((3, 16, 16), dtype=bool)
    true[:, 4:12, 4:12] = True  # an 8 x 8 lesion
    pred = np.zeros_like(true)
    pred[0] = true[0]  # perfect
    pred[1, 4:12, 6:14] = True  # shifted right by 2 px: overlap 8 x 6 = 48 of 64 + 64
    scores = segmentation_scores(pred, true)  # image 2: nothing predicted
    assert scores.shape == (3, 3) and SCORE_NAMES == ("dice", "iou", "hd95")
    np.testing.assert_allclose(scores[0], [1.0, 1.0, 0.0])
    np.testing.assert_allclose(scores[1], [2 * 48 / 128, 48 / 80, 2.0], rtol=1e-6)
    np.testing.assert_allclose(scores[2], [0.0, 0.0, np.hypot(16, 16)])  # an empty prediction: the diagonal


def test_resampled_score_is_the_weighted_mean_of_the_per_image_scores() -> None:
    scores = np.array([[0.9, 0.8, 1.0], [0.5, 0.3, 4.0], [0.1, 0.05, 9.0]])
    y = np.array([1, 2, 2])
    w = np.array([[1.0, 1.0, 1.0], [2.0, 0.0, 1.0]])
    np.testing.assert_allclose(weighted_metric("dice", y, scores, w, None), [0.5, (1.8 + 0.1) / 3])
    np.testing.assert_allclose(weighted_metric("hd95", y, scores, w, None), [14 / 3, 11 / 3])


@pytest.mark.parametrize(("arch", "deep"), [("unet", 0), ("attention_unet", 0), ("dynunet", 1), ("backbone_unet", 0)])
def test_segmenter_learns_lesions_of_32px_phantom_pairs(tmp_path: Path, arch: str, deep: int) -> None:
    pairs = lesion_pairs(make_phantom(PhantomConfig(n_per_class={"normal": 4, "benign": 40, "malignant": 40},
                                                    size=32)))
    assert len(pairs) == 80  # normal images have no lesion: not segmentation pairs
    train, test = pairs[:56], pairs[56:]
    levels = {"channels": [8, 16, 32], "strides": [2, 2]}
    if arch == "backbone_unet":  # a decoder level per stage of the backbone
        levels = {"channels": [8, 16, 32, 32], "backbone": str(tiny_resnet(tmp_path / "resnet"))}
    cfg = SegmenterConfig(image_size=32, epochs=40, batch_size=8, lr=5e-3, eval_every=10, checkpoint_every=10,
                          arch=arch, deep_supervision=deep, **levels)
    fit = fit_segmenter(stack_images(train, 32), stack_masks(train, 32), stack_images(test[:8], 32),
                        stack_masks(test[:8], 32), cfg, tmp_path, cpu=True)
    assert fit.steps == 40 * 7 and [r["epoch"] for r in fit.history][-1] == 39
    images, true = stack_images(test, 32), stack_masks(test, 32)
    dice = segmentation_scores(predict_masks(fit.model, images), true)[:, 0].mean()
    trivial = max(segmentation_scores(np.ones_like(true), true)[:, 0].mean(), 0.0)  # all lesion / nothing
    assert dice > trivial + 0.25, (dice, trivial)
    again = fit_segmenter(stack_images(train, 32), stack_masks(train, 32), stack_images(test[:8], 32),
                          stack_masks(test[:8], 32), cfg.model_copy(update={"tta": True}), tmp_path,
                          cpu=True)  # finished: loaded, not retrained (mirror averaging is not part of training)
    np.testing.assert_array_equal(predict_masks(again.model, images), predict_masks(fit.model, images))
    assert type(fit.model).__name__ == {"unet": "UNet", "attention_unet": "AttentionUnet", "dynunet": "DynUNet",
                                        "backbone_unet": "BackboneUNet"}[arch]


def test_deep_supervision_trains_every_head_and_predicts_with_the_main_one(tmp_path: Path) -> None:
    cfg = SegmenterConfig(image_size=32, channels=[8, 16, 32, 64], strides=[2, 2, 2], arch="dynunet",
                          deep_supervision=2)
    images = np.random.default_rng(0).integers(0, 256, (4, 1, 32, 32), dtype=np.uint8)
    masks = np.zeros((4, 1, 32, 32), dtype=bool)
    masks[:, :, 8:20, 10:24] = True
    val = (images[:2, 0], masks[:2, 0])
    stage = SegmenterStage(build_segmenter(cfg), cfg.model_copy(update={"augment": "none"}), 4, 0, val, tmp_path)
    batch = {"images": torch.from_numpy(images), "masks": torch.from_numpy(masks)}
    stage.model.train()
    heads = stage.model(batch["images"].float() / 255)
    assert heads.shape == (4, 3, 1, 32, 32)  # the main head and two coarser ones, upsampled to the image
    loss, _ = stage.loss(batch, torch.Generator().manual_seed(0))
    target = batch["masks"].float()
    per_head = [float(stage.loss_fn(heads[:, k].detach(), target)) for k in range(3)]
    assert loss.item() == pytest.approx(per_head[0] + per_head[1] / 2 + per_head[2] / 4, rel=1e-5)
    loss.backward()
    for head in stage.model.deep_supervision_heads:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    stage.model.eval()
    assert stage.model(batch["images"].float() / 255).shape == (4, 1, 32, 32)
    with pytest.raises(ValueError, match="deep_supervision needs segmenter.arch=dynunet"):
        SegmenterConfig(deep_supervision=1, arch="attention_unet")
    for arch in ("attention_unet", "backbone_unet"):
        with pytest.raises(ValueError, match=f"num_res_units=2 has no effect with segmenter.arch={arch}"):
            SegmenterConfig(num_res_units=2, arch=arch, backbone="org/model" if arch == "backbone_unet" else None)
    with pytest.raises(ValueError, match="at most len\\(strides\\) - 1 = 2"):
        SegmenterConfig(deep_supervision=3, arch="dynunet")


def fit_whole_and_killed_in_epoch_2(cfg: SegmenterConfig, tmp_path: Path, monkeypatch) -> tuple[tuple, SegmenterFit]:
    """Fit ``cfg`` on 20 phantom pairs (4 validation) in ``full/``, then again in ``cut/``, interrupted
    in epoch 2 (after its checkpoints of epochs 0 and 1); returns the data and the whole fit."""
    pairs = lesion_pairs(make_phantom(PhantomConfig(n_per_class={"normal": 2, "benign": 12, "malignant": 12},
                                                    size=32)))
    data = (stack_images(pairs[:20], 32), stack_masks(pairs[:20], 32), stack_images(pairs[20:], 32),
            stack_masks(pairs[20:], 32))
    full = fit_segmenter(*data, cfg, tmp_path / "full", seed=3, cpu=True)
    end_epoch = SegmenterStage.end_epoch

    def killed_in_epoch_2(self, epoch, *args, **kwargs):
        if epoch == 2:
            raise KeyboardInterrupt
        return end_epoch(self, epoch, *args, **kwargs)

    monkeypatch.setattr(SegmenterStage, "end_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        fit_segmenter(*data, cfg, tmp_path / "cut", seed=3, cpu=True)
    monkeypatch.setattr(SegmenterStage, "end_epoch", end_epoch)
    return data, full


def test_an_interrupted_deeply_supervised_dynunet_resumes_to_the_uninterrupted_weights(tmp_path: Path,
                                                                                      monkeypatch) -> None:
    cfg = SegmenterConfig(image_size=32, channels=[8, 16, 32], strides=[2, 2], epochs=4, batch_size=8,
                          arch="dynunet", deep_supervision=1, ema_epochs=1.0, eval_every=1, checkpoint_every=1)
    data, full = fit_whole_and_killed_in_epoch_2(cfg, tmp_path, monkeypatch)
    assert [c.name for c in (tmp_path / "cut").glob("checkpoint-*")] == ["checkpoint-6"]  # after epochs 0 and 1
    state_file = tmp_path / "cut" / "checkpoint-6" / "state.json"
    state = json.loads(state_file.read_text())

    def rewrite(identity: dict) -> None:  # as the checkpoint's writer would have: its key follows its identity
        state["identity"] = identity
        state["fit_key"] = fit_key(_what_was_trained(state))
        state_file.write_text(json.dumps(state))

    identity = dict(state["identity"])
    rewrite({**identity, "segmenter.validation": "train"})
    with pytest.raises(RunStateError, match="segmenter.validation"):
        fit_segmenter(*data, cfg, tmp_path / "cut", seed=3, cpu=True)
    del identity["segmenter.validation"]
    rewrite(identity)  # written before the setting existed: it counts as its default
    resumed = fit_segmenter(*data, cfg, tmp_path / "cut", seed=3, cpu=True)
    assert resumed.steps == full.steps == 4 * 3
    for key, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["unet", "attention_unet", "dynunet"])
def test_the_segmenters_norm_setting_is_the_norm_it_trains_with(arch: str) -> None:
    def norms(norm: str) -> set[tuple[str, int]]:
        cfg = SegmenterConfig(image_size=32, channels=[8, 16, 32], strides=[2, 2], arch=arch, norm=norm)
        return {(type(m).__name__, m.num_features) for m in build_segmenter(cfg).modules()
                if isinstance(m, torch.nn.BatchNorm2d | torch.nn.InstanceNorm2d)}

    instance, batch = norms("instance"), norms("batch")
    assert {c for n, c in batch if n == "BatchNorm2d"} >= {8, 16}
    # Per image everywhere; an attention gate's one-channel logit keeps its learned scale and shift.
    assert {(n, c) for n, c in instance if n == "BatchNorm2d"} <= {("BatchNorm2d", 1)}
    assert {c for n, c in instance if n == "InstanceNorm2d"} >= {8, 16}
    if arch == "attention_unet":
        assert ("BatchNorm2d", 1) in instance


def test_a_backbone_unet_starts_from_the_saved_weights_and_resumes_from_its_own(tmp_path: Path,
                                                                                 monkeypatch) -> None:
    saved = load_file(tiny_resnet(tmp_path / "resnet", seed=1) / "model.safetensors")
    cfg = SegmenterConfig(image_size=32, channels=[8, 16, 32, 32], epochs=4, batch_size=8, eval_every=1,
                          checkpoint_every=1, arch="backbone_unet", backbone=str(tmp_path / "resnet"))
    encoder = build_segmenter(cfg).backbone.state_dict()
    assert encoder.keys() == {k.removeprefix("resnet.") for k in saved if k.startswith("resnet.")}
    for key, value in encoder.items():  # the hub layout's weights, the classifier head left out
        torch.testing.assert_close(value, saved[f"resnet.{key}"], rtol=0, atol=0)
    fresh = build_segmenter(cfg, pretrained=False).backbone.state_dict()  # the architecture only
    assert not torch.equal(fresh["encoder.stages.0.layers.0.layer.0.convolution.weight"],
                           encoder["encoder.stages.0.layers.0.layer.0.convolution.weight"])

    data, full = fit_whole_and_killed_in_epoch_2(cfg, tmp_path, monkeypatch)
    (tmp_path / "resnet" / "model.safetensors").unlink()  # a resumed fit reads its weights from its checkpoint
    resumed = fit_segmenter(*data, cfg, tmp_path / "cut", seed=3, cpu=True)
    assert resumed.steps == full.steps == 4 * 3
    for key, value in full.model.state_dict().items():  # the backbone's batch-norm statistics included
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0)
    np.testing.assert_array_equal(predict_masks(load_segmenter(tmp_path / "cut", cfg), data[2]),
                                  predict_masks(full.model, data[2]))


def test_a_backbone_the_decoder_cannot_use_is_refused_naming_the_setting(tmp_path: Path, monkeypatch) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, Dinov2Config, Dinov2Model

    with pytest.raises(ValueError, match="arch=backbone_unet needs segmenter.backbone"):
        SegmenterConfig(arch="backbone_unet")
    with pytest.raises(ValueError, match="segmenter.backbone needs segmenter.arch=backbone_unet, got arch=unet"):
        SegmenterConfig(backbone="org/model")
    with pytest.raises(ValueError, match="no such folder"):
        SegmenterConfig(arch="backbone_unet", backbone=str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a model folder \\(no config.json\\)"):
        SegmenterConfig(arch="backbone_unet", backbone=str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)  # a folder is kept as an absolute path: Ray workers may start elsewhere
    tiny_resnet(tmp_path / "resnet")
    assert SegmenterConfig(arch="backbone_unet", backbone="resnet").backbone == str(tmp_path / "resnet")

    def build(folder: Path, **settings) -> None:
        build_segmenter(SegmenterConfig(image_size=32, arch="backbone_unet", backbone=str(folder), **settings))

    with pytest.raises(ConfigError, match="segmenter.channels needs at least 4 entries"):
        build(tmp_path / "resnet", channels=[8, 16, 32])
    CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "text")
    with pytest.raises(ConfigError, match="no backbone for a 'clip_text_model' model"):
        build(tmp_path / "text")
    Dinov2Model(Dinov2Config(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8,
                             patch_size=4, image_size=32)).save_pretrained(tmp_path / "vit")
    with pytest.raises(ConfigError, match="stages are at strides \\[4, 4\\]"):  # one resolution: no pyramid
        build(tmp_path / "vit")
    (tmp_path / "resnet" / "model.safetensors").rename(tmp_path / "resnet" / "elsewhere")
    with pytest.raises(ConfigError, match="segmenter.backbone .*resnet: cannot load ResNetBackbone"):
        build(tmp_path / "resnet")
    result = runner.invoke(app, ["config", "--config", "smoke", "--set", "segmenter.arch=backbone_unet",
                                 "--set", f"segmenter.backbone={tmp_path / 'missing'}"])
    assert result.exit_code == 2 and "segmenter.backbone" in result.output and "no such folder" in result.output
    assert "Traceback" not in result.output


class _LeftHalfBias(torch.nn.Module):
    """A lesion logit of +2 on bright pixels of the left half and -3 on the right, whatever the image."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = torch.full_like(x, -3.0)
        side[..., : x.shape[-1] // 2] = 2.0
        return self.scale * torch.where(x > 0.5, side, torch.full_like(x, -9.0))


def test_mirror_averaging_of_lesion_probabilities_is_undone_before_the_threshold() -> None:
    images = np.zeros((2, 8, 8), dtype=np.uint8)
    images[0, 2:6, 1:7] = 255  # symmetric: the mirror sees the same bright pixels
    images[1, :, :3] = 255  # bright on the left only: its mirror sees it on the right
    model = _LeftHalfBias()
    plain = predict_masks(model, images)
    mirrored = predict_masks(model, images, tta=True)
    # Image 0: left pixels average sigmoid(2) and sigmoid(-3) (0.464 < 0.5): no lesion any more.
    assert plain[0, 2:6, 1:4].all() and not plain[0, :, 4:].any()
    assert (expit(2.0) + expit(-3.0)) / 2 < 0.5 and not mirrored[0].any()
    # Image 1: the flipped pass sees bright pixels on the right (-3) and mirrors them back to the left.
    np.testing.assert_array_equal(plain[1], images[1] > 0)
    assert not mirrored[1].any()
    # At 0.45 the mirrored-back average (0.464) is a lesion; a flip left undone would give 0.440.
    assert (predict_masks(model, images, threshold=0.45, tta=True) == (images > 0)).all()


def test_the_gpu_preset_segments_with_the_cpu_presets_measured_segmenter() -> None:
    assert load_config("sd15").segmenter == load_config("cpu").segmenter
    assert load_config("sd15").segmenter.arch == "attention_unet"


def test_segmentation_takes_only_methods_with_masks_and_verdicts_on_dice() -> None:
    assert load_config("smoke", ["run.task=segmentation"]).run.primary_metric == "dice"
    with pytest.raises(ConfigError, match="cvae make no masks"):
        load_config("smoke", ["run.task=segmentation", "run.methods=[real,cvae]"])
    with pytest.raises(ConfigError, match="not a metric of run.task"):
        load_config("smoke", ["run.primary_metric=dice"])
    with pytest.raises(ConfigError, match="segmenter.strides"):
        load_config("smoke", ["segmenter.strides=[2]"])
    with pytest.raises(ConfigError, match="segmenter.num_res_units=0 has no effect"):
        load_config("cpu", ["segmenter.num_res_units=0"])


def test_a_segmentation_study_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "-c", "smoke", "--set", "run.task=segmentation", "--set", "run.seeds=2",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "results" / "summary.json").read_text())
    assert summary["task"] == "segmentation" and summary["protocol"]["primary_metric"] == "dice"
    assert {"dice", "iou", "hd95"} <= set(summary["metrics"]) and "balanced_accuracy" not in summary["metrics"]
    assert set(summary["aa"]) >= {"dice", "hd95"} and summary["paired"]["classical"]["verdict"]
    rows = [json.loads(p.read_text()) for p in out.glob("cells/*/*/metrics.json")]
    assert len(rows) == 8 and len({r["train_steps"] for r in rows}) == 1  # the same budget for every method
    for cell in out.glob("cells/*/fold*"):
        ids = json.loads((cell / "ids.json").read_text())
        scored = (cell / "scores.csv").read_text().splitlines()
        assert len(scored) == 1 + len(ids["test"]) and not any(i.startswith("normal") for i in ids["test"])
    report = (out / "report.html").read_text()
    assert "<h2>Segmentations</h2>" in report and "ROC curves" not in report
    assert "dice" in result.output and "A/A real" in result.output
    other = runner.invoke(app, ["run", "-c", "smoke", "--out", str(out)])  # the same folder, another task
    assert other.exit_code == 2 and "run.task (segmentation -> classification)" in other.output


def test_the_segmenter_can_train_on_the_folds_validation_pairs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "-c", "smoke", "--set", "run.task=segmentation", "--methods", "real",
                                 "--set", "segmenter.validation=train", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with (out / "data" / "split.csv").open() as fh:
        split = [row for row in csv.DictReader(fh) if row["label"] != "normal"]
    cells = sorted(out.glob("cells/real/fold*"))
    assert len(cells) == 4  # 2 folds x (seed 0, and seed 1 for the A/A row)
    for cell in cells:
        fold = cell.name.split("_")[0].removeprefix("fold")
        part = {p: {r["id"] for r in split if r["fold"] == fold and r["part"] == p} for p in ("train", "val", "test")}
        assert part["val"], "the fold must have validation pairs for this test to mean anything"
        ids = json.loads((cell / "ids.json").read_text())
        assert ids["val"] == [] and set(ids["classifier_train"]) == part["train"] | part["val"]
        assert set(ids["test"]) == part["test"]
        metrics = json.loads((cell / "metrics.json").read_text())
        assert metrics["n_val"] == 0 and metrics["n_train_real"] == len(part["train"] | part["val"])
        # the budget counts them (3 epochs, batch 8)
        assert metrics["train_steps"] == 3 * -(-metrics["n_train_real"] // 8)
        with (cell / "segmenter" / "history.csv").open() as fh:
            assert not any(row["val_dice"] for row in csv.DictReader(fh))  # no learning curve on training pairs


def test_a_segmentation_study_scores_an_external_set_of_another_scanner(tmp_path: Path) -> None:
    cfg = PhantomConfig(n_per_class={"benign": 8, "malignant": 6}, size=48, seed=11, scanner="second")
    ext = write_busi_layout(make_phantom(cfg, ["benign", "malignant"]), tmp_path / "second")
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "-c", "smoke", "--set", "run.task=segmentation", "--set", "run.seeds=2",
                                 "--out", str(out), "--external", f"second={ext}"])
    assert result.exit_code == 0, result.output
    files = sorted(out.glob("cells/*/fold*/external/second.csv"))
    assert len(files) == 8 and all(len(f.read_text().splitlines()) == 1 + 14 for f in files)
    summary = json.loads((out / "results/external/second.json").read_text())
    assert summary["task"] == "segmentation" and {"dice", "iou", "hd95"} <= set(summary["metrics"])
    assert "dice" in summary["aa"] and summary["paired"]["classical"]["verdict"]
    report = (out / "report.html").read_text()
    assert "External test sets" in report and "ROC curves" not in report
