"""bf16 autocast on a CPU only where the CPU computes bf16 natively; elsewhere fp32, said once."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from busynth import accel


@pytest.fixture
def fresh_detection(monkeypatch):
    """Forget the cached answer and the fields already warned about (before and after the test)."""
    detect = accel.cpu_supports_bf16  # the cached function (tests may replace the module attribute)
    detect.cache_clear()
    monkeypatch.setattr(accel, "_bf16_fallback_said", set())
    yield
    detect.cache_clear()


@pytest.mark.usefixtures("fresh_detection")
def test_bf16_falls_back_to_fp32_with_one_line_on_a_cpu_without_native_bf16(monkeypatch, caplog) -> None:
    monkeypatch.setattr(accel, "cpu_supports_bf16", lambda: False)
    caplog.set_level(logging.INFO, logger="busynth.accel")
    first = accel.make_accelerator("bf16", cpu=True, field="classifier.mixed_precision")
    second = accel.make_accelerator("bf16", cpu=True, field="classifier.mixed_precision")
    assert first.mixed_precision == "no" and second.mixed_precision == "no"
    said = [r for r in caplog.records if r.name == "busynth.accel"]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert "classifier.mixed_precision=bf16" in said[0].getMessage() and "fp32" in said[0].getMessage()


@pytest.mark.usefixtures("fresh_detection")
def test_bf16_is_kept_on_a_cpu_with_native_bf16(monkeypatch, caplog) -> None:
    monkeypatch.setattr(accel, "cpu_supports_bf16", lambda: True)
    caplog.set_level(logging.INFO, logger="busynth.accel")
    assert accel.make_accelerator("bf16", cpu=True).mixed_precision == "bf16"
    assert accel.make_accelerator("no", cpu=True).mixed_precision == "no"
    assert not [r for r in caplog.records if r.name == "busynth.accel"]


@pytest.mark.parametrize(("capabilities", "native"), [
    ({"avx512_f": True, "avx512_bf16": True}, True),
    ({"amx_bf16": True, "avx512_bf16": False}, True),
    ({"avx512_f": True, "avx512_vnni": True, "avx512_bf16": False}, False),  # AVX-512 alone is not enough
    ({"architecture": "aarch64", "bf16": True}, True),
    ({"architecture": "aarch64", "sve": True}, False),
])
@pytest.mark.usefixtures("fresh_detection")
def test_detection_reads_torch_cpu_capabilities(monkeypatch, capabilities: dict, native: bool) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities, raising=False)
    assert accel.cpu_supports_bf16() is native


@pytest.mark.parametrize(("cpuinfo", "native"), [
    ("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n", True),
    ("flags\t\t: fpu sse2 avx2 avx512f amx_tile amx_bf16\n", True),
    ("flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n", False),
    (None, False),  # no /proc/cpuinfo
])
@pytest.mark.usefixtures("fresh_detection")
def test_without_the_torch_api_detection_reads_proc_cpuinfo(monkeypatch, tmp_path: Path, cpuinfo, native) -> None:
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    path = tmp_path / "cpuinfo"
    if cpuinfo is not None:
        path.write_text(cpuinfo)
    monkeypatch.setattr(accel, "CPUINFO", path)
    assert accel.cpu_supports_bf16() is native
