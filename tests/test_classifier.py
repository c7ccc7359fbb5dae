"""Classifier: model shapes, builder errors, learning, determinism, checkpoints and resume."""

from __future__ import annotations

import csv
import math
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.tiny import tiny_resnet
from safetensors.torch import load_file
from torch import nn

import busynth.classify.train as train_mod
from busynth.checkpoint import list_checkpoints
from busynth.classify.checkpoints import load_classifier, read_safetensors_json
from busynth.classify.models import CompactResNet, build_classifier
from busynth.classify.train import (
    ClassifierStage,
    fit_classifier,
    predict_proba,
    random_hflip,
    validation_metrics,
)
from busynth.config import ClassifierConfig
from busynth.engine import StageConfig, learning_rate
from busynth.errors import ConfigError, DataError, RunStateError
from busynth.io import read_json, write_json

SIZE = 32
N_CLASSES = 3


def tiny_config(**changes) -> ClassifierConfig:
    base = {"image_size": SIZE, "width": 4, "epochs": 3, "batch_size": 8, "lr": 1e-2, "warmup_epochs": 0.5,
            "dropout": 0.1, "patience": 5, "select_metric": "balanced_accuracy"}
    return ClassifierConfig(**{**base, **changes})


def brightness_set(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class c = mean grey level 40 + 80c with noise: trivially separable."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(N_CLASSES), n_per_class)
    images = 40.0 + 80.0 * labels[:, None, None] + rng.normal(0, 12, (len(labels), SIZE, SIZE))
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return (*brightness_set(12, seed=1), *brightness_set(6, seed=2))


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    """Three uninterrupted epochs with seed 0, shared by several tests."""
    out = tmp_path_factory.mktemp("full")
    return fit_classifier(*data, tiny_config(), N_CLASSES, out, seed=0, cpu=True), out


@pytest.fixture(scope="module")
def full_dir(full_run) -> Path:
    return full_run[1]


def test_compact_resnet_shapes() -> None:
    model = CompactResNet(N_CLASSES, width=8, depth=[1, 2, 1, 1]).eval()
    x = torch.rand(5, 1, SIZE, SIZE)
    assert model(x).shape == (5, N_CLASSES)
    assert model.features(x).shape == (5, 64) and model.feature_dim == 64


def test_build_classifier_resnet_and_unknown_arch() -> None:
    model = build_classifier(tiny_config(), N_CLASSES)
    assert model(torch.rand(2, 1, SIZE, SIZE)).shape == (2, N_CLASSES)
    with pytest.raises(ConfigError, match="classifier.arch"):
        build_classifier(tiny_config(arch="vgg-ish"), N_CLASSES)


def test_missing_library_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(ConfigError, match="pip install timm"):
        build_classifier(tiny_config(arch="timm:resnet18"), N_CLASSES)


def test_timm_model_wrapped_and_weight_failure_is_config_error(monkeypatch) -> None:
    def create_model(name, pretrained, in_chans, num_classes):
        if pretrained:
            raise OSError("cannot reach huggingface.co")
        assert in_chans == 1 and num_classes == 0
        backbone = nn.Sequential(nn.Conv2d(1, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        backbone.num_features = 6
        return backbone

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    model = build_classifier(tiny_config(arch="timm:fake"), N_CLASSES)
    x = torch.rand(2, 1, SIZE, SIZE)
    assert model(x).shape == (2, N_CLASSES) and model.features(x).shape == (2, 6)
    with pytest.raises(ConfigError, match="pretrained=false"):
        build_classifier(tiny_config(arch="timm:fake", pretrained=True), N_CLASSES)


def test_an_hf_backbone_classifier_starts_from_the_saved_weights_and_loads_back_as_it_trained(
        data, tmp_path: Path, monkeypatch) -> None:
    saved = load_file(tiny_resnet(tmp_path / "resnet", seed=2) / "model.safetensors")
    monkeypatch.chdir(tmp_path)  # a folder is kept as an absolute path: Ray workers may start elsewhere
    cfg = tiny_config(arch="hf:resnet", pretrained=True)
    assert cfg.arch == f"hf:{tmp_path / 'resnet'}"
    model = build_classifier(cfg, N_CLASSES)
    encoder = model.backbone.backbone.state_dict()
    assert encoder.keys() == {k.removeprefix("resnet.") for k in saved if k.startswith("resnet.")}
    for key, value in encoder.items():  # the hub layout's weights, the image classifier's head left out
        torch.testing.assert_close(value, saved[f"resnet.{key}"], rtol=0, atol=0)
    x = torch.rand(2, 1, SIZE, SIZE)
    assert model(x).shape == (2, N_CLASSES) and model.features(x).shape == (2, 32) and model.feature_dim == 32
    assert model.backbone.backbone.out_features == ["stage4"]  # the pooled stage alone: no layer unused

    fit = fit_classifier(*data, cfg, N_CLASSES, tmp_path / "fit", seed=0, cpu=True)
    (tmp_path / "resnet" / "model.safetensors").unlink()  # a trained classifier has its own weights
    loaded = load_classifier(tmp_path / "fit", cfg, N_CLASSES)  # as evaluate and the external sets load it
    images = data[2]
    np.testing.assert_allclose(predict_proba(loaded, images), predict_proba(fit.model, images),
                               rtol=0, atol=1e-6)  # the same ImageNet normalisation as in training
    again = fit_classifier(*data, cfg, N_CLASSES, tmp_path / "fit", seed=0, cpu=True)  # finished: its own weights
    np.testing.assert_allclose(predict_proba(again.model, images), predict_proba(fit.model, images), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="classifier.arch .*resnet: cannot load ResNetBackbone"):
        build_classifier(cfg, N_CLASSES)  # the pretrained weights are gone
    with pytest.raises(ValueError, match="no such folder"):
        tiny_config(arch=f"hf:{tmp_path / 'nothing'}")


def test_lr_follows_the_engine_schedule_warmup_then_cosine_to_zero(full_run) -> None:
    steps = [r for r in full_run[0].history]  # epoch rows carry the lr of the epoch's last step
    schedule = StageConfig(steps=15, lr=1e-2, warmup_steps=round(0.5 * 5), min_lr_ratio=0.0)
    assert [r["lr"] for r in steps] == pytest.approx([learning_rate(s, schedule) for s in (4, 9, 14)])
    assert learning_rate(0, schedule) == pytest.approx(0.5e-2) and learning_rate(14, schedule) == pytest.approx(0.0)


def last_state(out: Path) -> dict:
    """state.json of the newest checkpoint in a classifier folder."""
    return read_json(list_checkpoints(out)[-1][1] / "state.json")


def test_random_hflip_flips_some_images_exactly() -> None:
    x = torch.arange(8 * 4 * 4, dtype=torch.float32).reshape(8, 1, 4, 4)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = [bool(torch.equal(o, xi.flip(-1))) for o, xi in zip(out, x)]
    kept = [bool(torch.equal(o, xi)) for o, xi in zip(out, x)]
    assert all(f != k for f, k in zip(flipped, kept)) and 0 < sum(flipped) < 8


def test_validation_metrics_values() -> None:
    y = np.array([0, 0, 1, 2])
    proba = np.array([[0.8, 0.1, 0.1], [0.4, 0.5, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7]])
    m = validation_metrics(y, proba)
    assert m["val_accuracy"] == 0.75
    assert m["val_balanced_accuracy"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert m["val_macro_auc"] == pytest.approx(1.0)
    assert m["val_loss"] == pytest.approx(-np.mean(np.log([0.8, 0.4, 0.7, 0.7])))


def test_learns_separable_set(full_run, data) -> None:
    history = full_run[0].history
    assert len(history) == 3
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    proba = predict_proba(full_run[0].model, data[2])
    assert proba.shape == (len(data[2]), N_CLASSES)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    assert (proba.argmax(1) == data[3]).mean() >= 0.9
    assert not full_run[0].model.training


def test_run_folder_contents(full_run, full_dir) -> None:
    out = full_dir
    assert (out / "best.safetensors").exists() and (out / "history.csv").exists()
    assert [step for step, _ in list_checkpoints(out)] == [15]  # 3 epochs x 5 steps, the newest kept
    state = last_state(out)
    assert state["stage"] == "classifier" and not state["stopped"]
    assert state["stage_state"]["best_epoch"] == full_run[0].best_epoch
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(15))
    assert [r["epoch"] for r in rows if r["epoch"]] == ["0", "1", "2"] and rows[4]["epoch"] == "0"
    assert {"loss", "train_loss", "val_balanced_accuracy", "val_macro_auc", "lr", "seconds"} <= set(rows[0])
    assert full_run[0].steps == 15


def test_same_seed_identical_other_seed_differs(full_run, data, tmp_path) -> None:
    again = fit_classifier(*data, tiny_config(), N_CLASSES, tmp_path / "a", seed=0, cpu=True)
    other = fit_classifier(*data, tiny_config(), N_CLASSES, tmp_path / "b", seed=1, cpu=True)
    reference = predict_proba(full_run[0].model, data[2])
    np.testing.assert_array_equal(predict_proba(again.model, data[2]), reference)
    assert not np.array_equal(predict_proba(other.model, data[2]), reference)


class Interrupt(Exception):
    pass


def _interrupt_at(stop_epoch: int):
    def log(row: dict, epoch: int) -> None:
        if epoch == stop_epoch:
            raise Interrupt
    return log


def test_resume_equals_uninterrupted_run(full_run, data, tmp_path) -> None:
    with pytest.raises(Interrupt):  # killed at the end of epoch 2, after epoch 1 was checkpointed
        fit_classifier(*data, tiny_config(), N_CLASSES, tmp_path, seed=0, tracker_log=_interrupt_at(1), cpu=True)
    assert last_state(tmp_path)["step"] == 5
    resumed = fit_classifier(*data, tiny_config(), N_CLASSES, tmp_path, seed=0, cpu=True)
    np.testing.assert_array_equal(predict_proba(resumed.model, data[2]), predict_proba(full_run[0].model, data[2]))
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert drop(resumed.history) == drop(full_run[0].history)


def test_finished_run_is_loaded_not_retrained(full_run, data, monkeypatch, full_dir) -> None:
    monkeypatch.setattr(ClassifierStage, "loss", lambda *a, **k: pytest.fail("retrained"))
    again = fit_classifier(*data, tiny_config(), N_CLASSES, full_dir, seed=0, cpu=True)
    assert again.best_epoch == full_run[0].best_epoch and again.steps == 15
    np.testing.assert_array_equal(predict_proba(again.model, data[2]), predict_proba(full_run[0].model, data[2]))


def test_changed_config_is_refused(full_run, data, full_dir) -> None:
    with pytest.raises(RunStateError, match="classifier.lr"):
        fit_classifier(*data, tiny_config(lr=0.5), N_CLASSES, full_dir, seed=0, cpu=True)


def _scripted_scores(monkeypatch, scores: list[float]) -> None:
    calls = iter(scores)

    def fake(y_true, proba):
        s = next(calls)
        return {"val_loss": 1.0, "val_accuracy": s, "val_balanced_accuracy": s, "val_macro_auc": s}

    monkeypatch.setattr(train_mod, "validation_metrics", fake)


def test_best_checkpoint_is_the_best_validation_epoch(data, tmp_path, monkeypatch) -> None:
    _scripted_scores(monkeypatch, [0.5, 0.9, 0.7])
    result = fit_classifier(*data, tiny_config(), N_CLASSES, tmp_path / "run", seed=0, cpu=True)
    assert result.best_epoch == 1 and result.best_score == 0.9
    best, meta = read_safetensors_json(tmp_path / "run" / "best.safetensors")
    assert meta["epoch"] == 1 and meta["score"] == 0.9
    last = read_safetensors_json(list_checkpoints(tmp_path / "run")[-1][1] / "weights.safetensors")[0]
    for key, value in result.model.state_dict().items():
        assert torch.equal(value, best[key]), key
    assert any(not torch.equal(best[k], last[k]) for k in last if best[k].is_floating_point())  # not epoch 3
    loaded = load_classifier(tmp_path / "run", tiny_config(), N_CLASSES)
    np.testing.assert_array_equal(predict_proba(loaded, data[2]), predict_proba(result.model, data[2]))


def test_early_stopping_after_patience(data, tmp_path, monkeypatch) -> None:
    _scripted_scores(monkeypatch, [0.9, 0.5, 0.5, 0.5, 0.5])
    result = fit_classifier(*data, tiny_config(epochs=5, patience=2), N_CLASSES, tmp_path, seed=0, cpu=True)
    assert len(result.history) == 3 and result.best_epoch == 0 and result.steps == 15
    assert last_state(tmp_path)["stopped"]
    monkeypatch.setattr(ClassifierStage, "loss", lambda *a, **k: pytest.fail("a stopped run was continued"))
    again = fit_classifier(*data, tiny_config(epochs=5, patience=2), N_CLASSES, tmp_path, seed=0, cpu=True)
    assert again.best_epoch == 0 and len(again.history) == 3


def test_bf16_and_gradient_accumulation_run(data, tmp_path) -> None:
    cfg = tiny_config(epochs=1, mixed_precision="bf16", grad_accum=2, class_weights="none", label_smoothing=0.1)
    result = fit_classifier(*data, cfg, N_CLASSES, tmp_path, seed=0, cpu=True)
    assert np.isfinite(result.history[0]["train_loss"])
    assert predict_proba(result.model, data[2]).shape == (len(data[2]), N_CLASSES)


def test_channels_last_option_trains_in_nhwc_and_matches_the_default_run(data, tmp_path) -> None:
    result = fit_classifier(*data, tiny_config(channels_last=True, epochs=2, width=8), N_CLASSES, tmp_path / "nhwc",
                            seed=0, cpu=True)
    default = fit_classifier(*data, tiny_config(epochs=2, width=8), N_CLASSES, tmp_path / "nchw", seed=0, cpu=True)
    assert result.model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert all(np.isfinite(r["train_loss"]) for r in result.history)
    proba = predict_proba(result.model, data[2])
    # Other kernels, other rounding: after 2 epochs the probabilities differ by ~1e-3 here (at lr 1e-2
    # on 36 images a third epoch amplifies the rounding differences to ~2e-2).
    np.testing.assert_allclose(proba, predict_proba(default.model, data[2]), atol=5e-3)
    # The checkpoint is stored contiguous: a plain (NCHW) model loads it and predicts the same.
    reloaded = load_classifier(tmp_path / "nhwc", tiny_config(channels_last=True, epochs=2, width=8), N_CLASSES)
    np.testing.assert_allclose(predict_proba(reloaded, data[2]), proba, atol=1e-5)


def test_run_saved_before_a_field_existed_is_loaded_when_the_field_has_its_default(full_run, data, tmp_path,
                                                                                  monkeypatch, full_dir) -> None:
    out = tmp_path / "old"
    shutil.copytree(full_dir, out)
    state_file = list_checkpoints(out)[-1][1] / "state.json"
    state = read_json(state_file)
    del state["identity"]["classifier.channels_last"]  # written before classifier.channels_last was added
    write_json(state_file, state)
    monkeypatch.setattr(ClassifierStage, "loss", lambda *a, **k: pytest.fail("retrained"))
    again = fit_classifier(*data, tiny_config(), N_CLASSES, out, seed=0, cpu=True)
    assert again.best_epoch == full_run[0].best_epoch
    with pytest.raises(RunStateError, match="classifier.channels_last"):
        fit_classifier(*data, tiny_config(channels_last=True, width=8), N_CLASSES, out, seed=0, cpu=True)


def test_test_time_augmentation_averages_an_image_and_its_mirror():
    torch.manual_seed(0)
    model = build_classifier(tiny_config(), 3)
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16), dtype=np.uint8)
    plain = train_mod.predict_proba(model, images)
    mirrored = train_mod.predict_proba(model, images[:, :, ::-1].copy())
    both = train_mod.predict_proba(model, images, tta=True)
    np.testing.assert_allclose(both, (plain + mirrored) / 2, rtol=1e-6, atol=1e-6)
    assert not np.allclose(both, plain)


def test_fixed_budget_keeps_the_final_moving_average(data, tmp_path) -> None:
    cfg = tiny_config(ema_epochs=1.0, select="last", patience=1)
    result = fit_classifier(*data, cfg, N_CLASSES, tmp_path, seed=0, cpu=True)
    assert result.best_epoch == 2 and len(result.history) == 3  # no early stop, the last epoch kept
    folder = list_checkpoints(tmp_path)[-1][1]
    ema = read_safetensors_json(folder / "ema.safetensors")[0]
    trained = read_safetensors_json(folder / "weights.safetensors")[0]
    best = read_safetensors_json(tmp_path / "best.safetensors")[0]
    for key, value in best.items():  # the kept weights are the average, not the trained ones
        torch.testing.assert_close(value, ema[f"module.{key}"])
    assert any(not torch.equal(best[k], trained[k]) for k in best if best[k].is_floating_point())


def test_resume_with_a_moving_average_equals_an_uninterrupted_run(data, tmp_path) -> None:
    cfg = tiny_config(ema_epochs=1.0, select="last")
    full = fit_classifier(*data, cfg, N_CLASSES, tmp_path / "full", seed=0, cpu=True)
    with pytest.raises(Interrupt):
        fit_classifier(*data, cfg, N_CLASSES, tmp_path / "cut", seed=0, tracker_log=_interrupt_at(1), cpu=True)
    resumed = fit_classifier(*data, cfg, N_CLASSES, tmp_path / "cut", seed=0, cpu=True)
    np.testing.assert_array_equal(predict_proba(resumed.model, data[2]), predict_proba(full.model, data[2]))
    assert resumed.steps == full.steps == 15


def test_added_images_do_not_add_optimizer_steps(data, tmp_path) -> None:
    images, labels, val_x, val_y = data
    real_only = fit_classifier(images, labels, val_x, val_y, tiny_config(), N_CLASSES, tmp_path / "a", cpu=True)
    doubled = fit_classifier(np.concatenate([images, images[:, ::-1]]), np.concatenate([labels, labels]), val_x, val_y,
                             tiny_config(), N_CLASSES, tmp_path / "b", cpu=True, n_real=len(images))
    assert doubled.steps == real_only.steps == 3 * math.ceil(len(images) / 8)
    few = fit_classifier(images[::3], labels[::3], val_x, val_y, tiny_config(), N_CLASSES, tmp_path / "d", cpu=True,
                         budget_rows=len(images))  # a third of the rows, trained for the budget of all of them
    assert few.steps == real_only.steps
    with pytest.raises(DataError, match="n_real"):
        fit_classifier(images, labels, val_x, val_y, tiny_config(), N_CLASSES, tmp_path / "c", cpu=True, n_real=0)


def test_scoring_and_checkpoints_every_few_epochs_change_no_result(data, tmp_path) -> None:
    base = tiny_config(ema_epochs=1.0, select="last", epochs=5)
    full = fit_classifier(*data, base, N_CLASSES, tmp_path / "full", seed=0, cpu=True)
    sparse = base.model_copy(update={"eval_every": 2, "checkpoint_every": 2})
    with pytest.raises(Interrupt):  # killed in epoch 3: the checkpoint after epoch 2 is the last one written
        fit_classifier(*data, sparse, N_CLASSES, tmp_path / "cut", seed=0, tracker_log=_interrupt_at(2), cpu=True)
    assert last_state(tmp_path / "cut")["step"] == 10
    resumed = fit_classifier(*data, sparse, N_CLASSES, tmp_path / "cut", seed=0, cpu=True)
    np.testing.assert_array_equal(predict_proba(resumed.model, data[2]), predict_proba(full.model, data[2]))
    assert resumed.steps == full.steps
    scored = [r["epoch"] for r in resumed.history if r["val_loss"] is not None]
    assert scored == [1, 3, 4]  # epochs 2 and 4 (every second) and the last
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]
    with open(tmp_path / "cut" / "history.csv", newline="") as fh:
        ends = [row for row in csv.DictReader(fh) if row["epoch"]]
    assert [row["val_loss"] == "" for row in ends] == [True, False, True, False, False]


def test_scoring_every_few_epochs_needs_the_fixed_budget() -> None:
    with pytest.raises(ValueError, match="eval_every > 1 needs select=last"):
        tiny_config(select="best", eval_every=2)


def test_channels_last_on_a_layer_too_narrow_for_its_kernels_is_refused() -> None:
    with pytest.raises(ValueError, match="channels_last needs width >= 8"):
        tiny_config(channels_last=True, width=4)


def lesion_set(n: int, seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Speckle with a bright square 'lesion' at a random place (none for class 0; side 12 or 20 px
    for classes 1 and 2): images uint8 (n, size, size), labels, masks bool (the squares)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, N_CLASSES, n).astype(np.int64)
    images = rng.normal(60, 15, (n, size, size))
    masks = np.zeros((n, size, size), dtype=bool)
    for i, label in enumerate(labels):
        if label:
            side = 12 if label == 1 else 20
            r, c = rng.integers(0, size - side, 2)
            masks[i, r : r + side, c : c + side] = True
    images[masks] += 110
    return np.clip(images, 0, 255).astype(np.uint8), labels, masks


def test_lesion_share_loss_is_cross_entropy_against_the_pooled_mask_on_rows_with_a_mask() -> None:
    masks = torch.zeros(2, 1, 4, 4)
    masks[0, 0, :2, :2] = 1  # top-left cell all lesion
    masks[0, 0, 0, 3] = 1  # one pixel of the top-right cell
    masks[1] = 1
    logits = torch.tensor([[[[2.0, 0.0], [-1.0, 0.0]]], [[[5.0, 5.0], [5.0, 5.0]]]])
    shares = [1.0, 0.25, 0.0, 0.0]
    by_hand = np.mean([math.log1p(math.exp(v)) - t * v for v, t in zip([2.0, 0.0, -1.0, 0.0], shares, strict=True)])
    first_only = train_mod.lesion_share_loss(logits, masks, torch.tensor([True, False]))
    assert float(first_only) == pytest.approx(by_hand, rel=1e-6)
    both = train_mod.lesion_share_loss(logits, masks, torch.tensor([True, True]))
    assert float(both) == pytest.approx((by_hand + math.log1p(math.exp(-5.0))) / 2, rel=1e-6)
    assert float(train_mod.lesion_share_loss(logits, masks, torch.tensor([False, False]))) == 0.0


class _SeesInputs(nn.Module):
    """Wraps a classifier and keeps the last batch it was given."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.seen = inner, None

    def forward(self, x: torch.Tensor, with_mask: bool = False):
        self.seen = x
        return self.inner(x, with_mask=with_mask)


@pytest.mark.parametrize("augment", ["flip", "light", "strong"])
def test_masks_go_through_the_same_flips_and_warps_as_their_images(augment, tmp_path, monkeypatch) -> None:
    images, labels, masks = lesion_set(16, seed=3)
    images = np.where(masks, 220, 20).astype(np.uint8)  # the image is its mask: any misalignment shows
    cfg = tiny_config(image_size=64, width=8, mask_weight=1.0, augment=augment)
    model = _SeesInputs(build_classifier(cfg, N_CLASSES))
    stage = ClassifierStage(model, cfg, nn.CrossEntropyLoss(), 16, 0, 2, (images, labels), tmp_path, {})
    seen_masks = []
    monkeypatch.setattr(train_mod, "lesion_share_loss", lambda logits, m, has: seen_masks.append(m) or m.sum() * 0)
    batch = {"images": torch.from_numpy(images).unsqueeze(1), "labels": torch.from_numpy(labels),
             "masks": torch.from_numpy(masks).unsqueeze(1), "has_mask": torch.ones(16, dtype=torch.bool)}
    loss, extras = stage.loss(batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and "mask_loss" in extras
    x, m = model.seen, seen_masks[0] > 0.5
    assert not torch.equal(m, torch.from_numpy(masks).unsqueeze(1))  # the batch was moved at all
    agreement = ((x > 0.45) == m).float().mean().item()  # lesion 0.86 and background 0.08 before jitter
    assert agreement == 1.0 if augment == "flip" else agreement > 0.98, agreement


def test_the_mask_head_learns_where_the_lesion_is_and_rows_without_a_mask_teach_it_nothing(tmp_path) -> None:
    images, labels, masks = lesion_set(64, seed=4)
    test_images, _, test_masks = lesion_set(32, seed=5)
    cfg = tiny_config(image_size=64, width=8, mask_weight=1.0, epochs=12, select="last", augment="flip")
    fit = fit_classifier(images, labels, images[:16], labels[:16], cfg, N_CLASSES, tmp_path / "mask", seed=0,
                         cpu=True, train_masks=masks)
    with torch.no_grad():
        _, mask_logits = fit.model(torch.from_numpy(test_images).unsqueeze(1).float() / 255, with_mask=True)
    prob = torch.sigmoid(mask_logits)
    share = nn.functional.adaptive_avg_pool2d(torch.from_numpy(test_masks).unsqueeze(1).float(), prob.shape[-2:])
    inside, outside = prob[share > 0.5].mean().item(), prob[share == 0].mean().item()
    assert inside > outside + 0.2, (inside, outside)  # 0.41 against 0.02 here
    with (tmp_path / "mask" / "history.csv").open() as fh:
        mask_losses = [float(r["mask_loss"]) for r in csv.DictReader(fh)]
    assert np.mean(mask_losses[-4:]) < np.mean(mask_losses[:4]) - 0.1
    reloaded = load_classifier(tmp_path / "mask", cfg, N_CLASSES)  # as `busynth evaluate` loads it: head and all
    np.testing.assert_array_equal(predict_proba(reloaded, test_images), predict_proba(fit.model, test_images))
    # Rows flagged without a mask feed no mask loss: with none flagged the head stays where it began.
    none = fit_classifier(images, labels, images[:16], labels[:16], cfg, N_CLASSES, tmp_path / "none", seed=0,
                          cpu=True, train_masks=masks, has_mask=np.zeros(len(images), dtype=bool))
    assert not torch.count_nonzero(none.model.mask_head.weight) and not torch.count_nonzero(none.model.mask_head.bias)


def test_mask_weight_needs_masks_and_the_built_in_network(data, tmp_path) -> None:
    with pytest.raises(DataError, match="mask_weight > 0 needs the lesion masks"):
        fit_classifier(*data, tiny_config(mask_weight=1.0), N_CLASSES, tmp_path, cpu=True)
    with pytest.raises(DataError, match="training masks must be bool"):
        fit_classifier(*data, tiny_config(mask_weight=1.0), N_CLASSES, tmp_path, cpu=True,
                       train_masks=np.zeros((3, SIZE, SIZE), dtype=bool))
    with pytest.raises(ValueError, match="mask_weight > 0 needs arch=resnet"):
        tiny_config(mask_weight=1.0, arch="timm:resnet18")
    plain = CompactResNet(N_CLASSES, width=8)
    with pytest.raises(ValueError, match="without a mask head"):
        plain(torch.rand(2, 1, SIZE, SIZE), with_mask=True)
