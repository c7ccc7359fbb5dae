"""Untrusted files: a checkpoint folder or a pretrained folder never gets unpickled, and paths read
from split files and synthetic manifests never leave their folder.

The weight-file tests plant a pickle whose loading would create a marker file (``Path.touch``,
harmless) under every name a loader might read, call the real resume/load paths, and check that
each refuses with a clear error and that the marker never appears. Models are 16 px, a step or two.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from helpers.tiny import CLASSES, TINY_MODEL
from typer.testing import CliRunner

from busynth.cells import read_synthetic
from busynth.checkpoint import load_checkpoint, read_safetensors, save_checkpoint
from busynth.classify.train import fit_classifier
from busynth.cli import app
from busynth.config import ClassifierConfig, PhantomConfig
from busynth.data.audit import audit_records
from busynth.data.phantom import make_phantom
from busynth.data.records import check_inside
from busynth.data.splits import read_split
from busynth.errors import ConfigError, DataError, RunStateError
from busynth.generators.base import MANIFEST, Synthetic, read_generator_info, write_samples
from busynth.generators.classical import ClassicalAugmenter
from busynth.generators.cvae import CVAEGenerator

CVAE = {"image_size": 16, "channels": [4, 8], "latent_dim": 4, "class_embed_dim": 2, "steps": 2, "batch_size": 4,
        "kl_warmup_steps": 1, "checkpoint_every": 1}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TouchOnUnpickle:
    """Unpickling this calls ``Path.touch(marker)``: proof that a loader ran code from a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant_pickle(path: Path, marker: Path, torch_format: bool = False) -> Path:
    """Write a malicious pickle to ``path``: a bare pickle, or torch.save's zip format (``*.bin``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"weight": TouchOnUnpickle(marker)}
    if torch_format:
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    return path


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """Where a planted pickle would leave its mark; each test checks it never appears."""
    path = tmp_path / "pickle-ran"
    yield path
    assert not path.exists(), "a pickle from a checkpoint folder was executed"


@pytest.fixture(scope="module")
def records():
    """Twelve 16 px phantom records with masks, four per class."""
    return make_phantom(PhantomConfig(n_per_class={c: 4 for c in CLASSES}, size=16, near_duplicate_rate=0.0), CLASSES)


def test_the_planted_pickles_do_run_code_when_unpickled(tmp_path: Path) -> None:
    """The payloads are live: a loader that unpickled them would create the marker."""
    raw, zipped = tmp_path / "raw-ran", tmp_path / "zip-ran"
    pickle.loads(plant_pickle(tmp_path / "a.safetensors", raw).read_bytes())
    torch.load(plant_pickle(tmp_path / "b.bin", zipped, torch_format=True), weights_only=False)
    assert raw.exists() and zipped.exists()


# --- busynth.checkpoint: every training loop's step checkpoints --------------------------------


@pytest.mark.parametrize("name", ["weights.safetensors", "optimizer.safetensors"])
def test_load_checkpoint_refuses_a_pickle_naming_the_file(tmp_path: Path, marker: Path, name: str) -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    folder = save_checkpoint(tmp_path, 1, model.state_dict(), optimizer, {"seed": 0}, keep=2)
    assert set(load_checkpoint(folder, optimizer)) == {"weight", "bias"}
    plant_pickle(folder / name, marker)
    with pytest.raises(RunStateError, match="not a readable safetensors file") as info:
        load_checkpoint(folder, torch.optim.Adam(model.parameters()))
    assert str(folder / name) in str(info.value)


def test_read_safetensors_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RunStateError, match="missing") as info:
        read_safetensors(tmp_path / "none.safetensors")
    assert str(tmp_path / "none.safetensors") in str(info.value)


def test_train_stage_resume_refuses_a_pickled_checkpoint(tmp_path: Path, marker: Path) -> None:
    from busynth.engine import StageConfig, train_stage
    from busynth.generators.diffusion.components import (
        TinyModelConfig,
        build_tiny_components,
    )
    from busynth.generators.diffusion.train import NoisePredictionStage

    def stage_and_data():
        parts = build_tiny_components(TinyModelConfig(**TINY_MODEL), 16, ["a breast ultrasound image"], seed=0)
        g = torch.Generator().manual_seed(0)
        embeddings = torch.randn(3, 4, parts.text_encoder.config.hidden_size, generator=g)
        data = {"moments": torch.cat([torch.randn(4, 4, 2, 2, generator=g), torch.full((4, 4, 2, 2), -6.0)], 1),
                "prompt": torch.arange(4) % 2}
        stage = NoisePredictionStage("base", parts.unet, parts.unet, parts.noise_scheduler, embeddings, 2, 1.0)
        return stage, data

    cfg = StageConfig(steps=2, batch_size=2, checkpoint_every=1)
    train_stage(*stage_and_data(), cfg, tmp_path, seed=0)
    folder = tmp_path / "checkpoint-2"
    plant_pickle(folder / "weights.safetensors", marker)
    with pytest.raises(RunStateError, match="not a readable safetensors file") as info:
        train_stage(*stage_and_data(), cfg, tmp_path, seed=0)
    assert str(folder / "weights.safetensors") in str(info.value)


# --- generators: resume and load(dir) ----------------------------------------------------------


def test_cvae_resume_and_load_refuse_pickles(records, tmp_path: Path, marker: Path) -> None:
    out = tmp_path / "cvae"
    CVAEGenerator(CVAE, classes=CLASSES).fit(records, out, seed=0)
    assert CVAEGenerator.load(out).sample("benign", 1)[0].image.shape == (16, 16)

    plant_pickle(out / "model.safetensors", marker)
    with pytest.raises(RunStateError, match="not a readable safetensors file") as info:
        CVAEGenerator.load(out)
    assert str(out / "model.safetensors") in str(info.value)
    result = CliRunner().invoke(app, ["generate", "cvae", "--checkpoint", str(out), "--out", str(tmp_path / "g")])
    assert result.exit_code == 2 and "model.safetensors" in result.output and "Traceback" not in result.output

    (out / "model.safetensors").unlink()  # an unfinished fit: resumes from its last checkpoint
    (out / "generator.json").unlink()
    plant_pickle(out / "checkpoint-2" / "optimizer.safetensors", marker)
    with pytest.raises(RunStateError, match="optimizer.safetensors"):
        CVAEGenerator(CVAE, classes=CLASSES).fit(records, out, seed=0)


def test_classical_load_refuses_a_pickled_image_store(records, tmp_path: Path, marker: Path) -> None:
    out = ClassicalAugmenter({"image_size": 16}, classes=CLASSES).fit(records, tmp_path / "classical")
    plant_pickle(out / "train.safetensors", marker)
    with pytest.raises(RunStateError, match="train.safetensors"):
        ClassicalAugmenter.load(out)


def test_classifier_resume_and_load_never_unpickle(tmp_path: Path, marker: Path) -> None:
    """A pickle under the classifier's ``best.safetensors`` or its checkpoint's weights is refused
    with a message naming the file, and never run."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (12, 16, 16), dtype=np.uint8)
    labels = np.arange(12) % 3
    cfg = ClassifierConfig(image_size=16, width=4, depth=[1], epochs=1, batch_size=4, tta=False)
    fit_classifier(images, labels, images, labels, cfg, 3, tmp_path, seed=0, cpu=True)
    for name in ("best.safetensors", "checkpoint-3/weights.safetensors"):
        plant_pickle(tmp_path / name, marker)
        with pytest.raises(RunStateError, match=name):
            fit_classifier(images, labels, images, labels, cfg, 3, tmp_path, seed=0, cpu=True)
        assert not marker.exists()


# --- diffusion: safetensors only, and a LoRA only on the base it was made for -----------------


@pytest.fixture(scope="module")
def sd_folders(tmp_path_factory):
    """Three tiny Stable Diffusion folders (diffusers layout): ``a``; ``other_weights`` (same
    architecture, another seed); ``other_arch`` (wider text encoder, so cross-attention differs)."""
    from busynth.generators.diffusion.components import (
        TinyModelConfig,
        build_tiny_components,
    )

    root = tmp_path_factory.mktemp("sd")
    for name, model, seed in (("a", TINY_MODEL, 0), ("other_weights", TINY_MODEL, 1),
                              ("other_arch", {**TINY_MODEL, "text_hidden_size": 32}, 0)):
        build_tiny_components(TinyModelConfig(**model), 16, ["a breast ultrasound image"], seed).pipeline() \
            .save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def sd_lora_fit(records, sd_folders, tmp_path_factory):
    """An sd-lora fit (1 LoRA step) on the pretrained folder ``a``, and its config."""
    from busynth.generators.diffusion.sd_lora import SDLoraGenerator

    base = tmp_path_factory.mktemp("base") / "sd"
    shutil.copytree(sd_folders / "a", base)
    cfg = {"source": "pretrained", "pretrained_model": str(base), "image_size": 16, "lora": {"rank": 2, "alpha": 2.0},
           "lora_training": {"steps": 1, "batch_size": 4}, "sampling_steps": 1}
    out = SDLoraGenerator(cfg, classes=CLASSES).fit(records, tmp_path_factory.mktemp("fit"), seed=0)
    return out, base


def _swap_base(base: Path, replacement: Path) -> None:
    shutil.rmtree(base)
    shutil.copytree(replacement, base)


def test_sd_lora_records_its_base_and_refuses_another(sd_lora_fit, sd_folders) -> None:
    from busynth.generators.diffusion.sd_lora import SDLoraGenerator

    out, base = sd_lora_fit
    info = read_generator_info(out)
    assert info["base_model"]["model"] == str(base)
    assert set(info["base_model"]) == {"model", "architecture", "weights"}
    assert SDLoraGenerator.load(out).sample("benign", 1)[0].image.shape == (16, 16)
    try:
        for replacement in ("other_weights", "other_arch"):
            _swap_base(base, sd_folders / replacement)
            with pytest.raises(RunStateError, match="made for another base model") as info_err:
                SDLoraGenerator.load(out)
            message = str(info_err.value)
            assert str(out / "lora") in message and message.count(str(base)) == 2, message
        # An artifact without a recorded base (older versions): the LoRA's shapes are checked instead.
        saved = json.loads((out / "generator.json").read_text())
        (out / "generator.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "base_model"}))
        with pytest.raises(RunStateError, match="does not fit the UNet") as info_err:
            SDLoraGenerator.load(out)
        assert "attn2.to_k has 32 input features, the LoRA 16" in str(info_err.value)
    finally:
        _swap_base(base, sd_folders / "a")
        (out / "generator.json").write_text(json.dumps(info))


@pytest.mark.parametrize(("subfolder", "weights", "config"), [
    ("unet", "diffusion_pytorch_model", "config.json"),
    ("vae", "diffusion_pytorch_model", "config.json"),
    ("text_encoder", "model", "config.json"),
])
def test_pretrained_folder_with_only_pickled_weights_is_refused(sd_lora_fit, marker, subfolder, weights, config):
    """A model folder whose weights are a ``*.bin`` pickle next to its config is never read."""
    from busynth.generators.diffusion.sd_lora import SDLoraGenerator

    out, base = sd_lora_fit
    original = base / subfolder / f"{weights}.safetensors"
    moved = original.with_suffix(".keep")
    original.rename(moved)
    bin_name = "pytorch_model.bin" if subfolder == "text_encoder" else f"{weights}.bin"
    planted = plant_pickle(base / subfolder / bin_name, marker, torch_format=True)
    assert (base / subfolder / config).is_file()
    try:
        with pytest.raises(ConfigError, match="safetensors") as info:
            SDLoraGenerator.load(out)
        assert str(base) in str(info.value)
    finally:
        planted.unlink()
        moved.rename(original)


def test_pickled_lora_file_is_refused(sd_lora_fit, marker) -> None:
    from busynth.generators.diffusion.lora import LORA_WEIGHT_NAME
    from busynth.generators.diffusion.sd_lora import SDLoraGenerator

    out, _ = sd_lora_fit
    lora = out / "lora" / LORA_WEIGHT_NAME
    kept = lora.read_bytes()
    plant_pickle(lora, marker)
    try:
        with pytest.raises(RunStateError, match="not a readable safetensors file") as info:
            SDLoraGenerator.load(out)
        assert str(lora) in str(info.value)
    finally:
        lora.write_bytes(kept)


def test_controlnet_folder_with_only_pickled_weights_is_refused(sd_folders, tmp_path, marker) -> None:
    from diffusers import ControlNetModel, UNet2DConditionModel

    from busynth.checkpoint import from_pretrained

    unet = UNet2DConditionModel.from_pretrained(sd_folders / "a", subfolder="unet")
    folder = tmp_path / "cn"
    ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).save_pretrained(folder)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    plant_pickle(folder / "diffusion_pytorch_model.bin", marker, torch_format=True)
    with pytest.raises(ConfigError, match="generators.controlnet.pretrained_controlnet") as info:
        from_pretrained(ControlNetModel, folder, what="generators.controlnet.pretrained_controlnet",
                        error=ConfigError)
    assert str(folder) in str(info.value)


# --- paths read from files stay inside their folder --------------------------------------------


def _manifest(folder: Path, *entries: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).write_text("".join(json.dumps(e) + "\n" for e in entries))
    return folder / MANIFEST


GOOD = {"generator": "cvae", "checkpoint": "x", "label": "benign", "index": 1, "seed": 0,
        "image": "benign/benign (1).png"}


@pytest.mark.parametrize(("key", "value", "problem"), [
    ("image", "../../etc/passwd", "'..' is not allowed"),
    ("image", "benign/../../outside.png", "'..' is not allowed"),
    ("image", "/etc/passwd", "absolute path"),
    ("image", "C:\\Windows\\win.ini", "absolute path"),
    ("image", "~/secret.png", "absolute path"),
    ("mask", "../mask.png", "'..' is not allowed"),
    ("image", 3, "not a file path"),
])
def test_manifest_path_outside_its_folder_is_refused_naming_file_and_line(tmp_path, key, value, problem) -> None:
    folder = tmp_path / "synthetic"
    write_samples([Synthetic(np.zeros((8, 8), np.uint8), "benign")], folder, "cvae", "ckpt")
    manifest = _manifest(folder, GOOD, {**GOOD, "index": 2, key: value})
    with pytest.raises(DataError, match=problem) as info:
        read_synthetic(folder, "cvae")
    assert f"{manifest}:2: {key}" in str(info.value)
    with pytest.raises(DataError, match=problem):  # appending to such a folder is refused too
        write_samples([Synthetic(np.zeros((8, 8), np.uint8), "benign")], folder, "cvae", "ckpt")


def test_manifest_symlink_leaving_the_folder_is_refused(tmp_path) -> None:
    folder = tmp_path / "synthetic"
    (folder / "benign").mkdir(parents=True)
    (tmp_path / "outside.png").write_bytes(b"")
    (folder / "benign" / "benign (1).png").symlink_to(tmp_path / "outside.png")
    _manifest(folder, GOOD)
    with pytest.raises(DataError, match="resolves outside"):
        read_synthetic(folder, "cvae")


@pytest.mark.parametrize(("line", "problem"), [("not json", "not a JSON object"),
                                               ('{"label": "benign"}', "needs the keys"),
                                               ('["a"]', "needs the keys")])
def test_malformed_manifest_line_is_refused_with_its_number(tmp_path, line, problem) -> None:
    folder = tmp_path / "synthetic"
    _manifest(folder, GOOD)
    with (folder / MANIFEST).open("a") as fh:
        fh.write(line + "\n")
    with pytest.raises(DataError, match=problem) as info:
        read_synthetic(folder, "cvae")
    assert f"{folder / MANIFEST}:2" in str(info.value)


def test_samples_round_trip_through_the_manifest(tmp_path) -> None:
    folder = tmp_path / "synthetic"
    mask = np.zeros((8, 8), bool)
    mask[2:5, 2:5] = True
    write_samples([Synthetic(np.full((8, 8), 7, np.uint8), "benign", mask=mask, seed=3)], folder, "cvae", "ckpt")
    write_samples([Synthetic(np.full((8, 8), 9, np.uint8), "benign", seed=4)], folder, "cvae", "ckpt")
    got = read_synthetic(folder, "cvae")
    assert [r.id for r in got] == ["cvae:benign_1", "cvae:benign_2"]
    assert got[0].image.max() == 7 and np.array_equal(got[0].mask, mask) and got[1].mask is None


def test_write_samples_refuses_a_class_name_that_is_a_path(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not a plain folder name"):
        write_samples([Synthetic(np.zeros((8, 8), np.uint8), "../escape")], tmp_path / "s", "cvae", "ckpt")
    assert not (tmp_path / "escape").exists()


@pytest.mark.parametrize(("value", "problem"), [("../../etc/passwd", "'..' is not allowed"),
                                                ("/etc/passwd", "absolute path"),
                                                ("benign\\..\\..\\x.png", "'..' is not allowed")])
def test_split_file_path_outside_the_data_set_is_refused_naming_file_and_line(phantom_records, tmp_path, value,
                                                                              problem) -> None:
    path = tmp_path / "split.csv"
    rows = [f"{r.path},train" for r in phantom_records[:3]] + [f"{value},test"]
    path.write_text("path,split\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=problem) as info:
        read_split(path, phantom_records, audit_records(phantom_records))
    assert f"{path}:5: path" in str(info.value)


def test_split_file_unknown_ids_are_named_with_their_lines(phantom_records, tmp_path) -> None:
    path = tmp_path / "split.csv"
    path.write_text("id,split\n" + f"{phantom_records[0].id},train\n" + "benign_999,test\n")
    with pytest.raises(DataError, match=r"1 id\(s\) not in the data set, e.g. line 3: 'benign_999'") as info:
        read_split(path, phantom_records)
    assert str(path) in str(info.value)


def test_check_inside_accepts_relative_paths_in_the_folder(tmp_path) -> None:
    assert check_inside(tmp_path, "benign/benign (1).png", "x") == tmp_path / "benign" / "benign (1).png"
    assert check_inside(tmp_path, "a..b.png", "x") == tmp_path / "a..b.png"
