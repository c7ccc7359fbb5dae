"""Readable logs: the progress reporter of training loops, the one line per fit, the run-level ETA,
and the CLI's log handler (plain full-width lines off a terminal, library messages routed and filtered)."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from busynth import executors, experiment
from busynth import progress as progress_module
from busynth.logs import setup_logging
from busynth.presets import load_config
from busynth.progress import format_duration, log_fit, progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(progress_module.time, "monotonic", fake)
    return fake


def lines(caplog, name: str = "busynth.progress") -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == name]


@pytest.mark.parametrize(("seconds", "text"), [(0.25, "250ms"), (42.4, "42s"), (250, "4m10s"), (3725, "1h02m")])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_off_a_terminal_a_line_at_most_every_interval_with_step_loss_and_eta(caplog, clock) -> None:
    caplog.set_level(logging.INFO)
    with progress(9, "cvae fit", interval=30, terminal=False, enabled=True) as bar:
        for step in range(9):
            clock.now += 10
            bar.update(1, loss=2.0 / (step + 1))
    got = lines(caplog)
    assert got == [
        "cvae fit: step 3/9 (33%), loss 0.6667, 10 s/step, ETA 1m00s",
        "cvae fit: step 6/9 (67%), loss 0.3333, 10 s/step, ETA 30s",
        "cvae fit: step 9/9 (100%), loss 0.2222, 10 s/step, ETA 0s",
    ]


def test_interval_zero_logs_every_update_and_a_resumed_loop_counts_from_initial(caplog, clock) -> None:
    caplog.set_level(logging.INFO)
    bar = progress(10, "lora", initial=4, interval=0, terminal=False, enabled=True)
    bar.set_postfix(kl=0.5)
    for _ in range(2):
        clock.now += 2
        bar.update(1, loss=1.0)
    bar.close()
    assert lines(caplog) == ["lora: step 5/10 (50%), kl 0.5, loss 1, 2 s/step, ETA 10s",
                             "lora: step 6/10 (60%), kl 0.5, loss 1, 2 s/step, ETA 8s"]
    assert bar.count == 2 and bar.elapsed == pytest.approx(4.0)


def test_only_the_local_main_process_reports(caplog, monkeypatch) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with progress(3, "base", interval=0, terminal=False) as bar:
        bar.update(3)
    with progress(3, "base", interval=0, terminal=False, enabled=False) as bar:
        bar.update(3)
    assert lines(caplog) == []
    monkeypatch.setenv("LOCAL_RANK", "0")
    with progress(3, "base", interval=0, terminal=False) as bar:
        bar.update(3)
    assert len(lines(caplog)) == 1


def test_on_a_terminal_it_draws_a_tqdm_bar_and_logs_nothing(caplog, capsys) -> None:
    caplog.set_level(logging.INFO)
    with progress(4, "autoencoder", interval=0, terminal=True, enabled=True) as bar:
        bar.update(4, loss=0.25)
    assert lines(caplog) == []
    err = capsys.readouterr().err
    assert "autoencoder" in err and "4/4" in err and "loss=0.25" in err


def test_log_fit_writes_one_line_per_finished_fit(caplog) -> None:
    caplog.set_level(logging.INFO)
    text = log_fit("cvae", 400, 200.0, resumed_at_step=100, last_loss=101.25)
    assert text == "cvae: fit done, 400 steps in 3m20s (0.5 s/step), resumed at step 100, last loss 101.2"
    assert lines(caplog) == [text]
    assert log_fit("classifier", 1, 3.0, unit="epoch") == "classifier: fit done, 1 epoch in 3s (3 s/epoch)"


def test_run_study_logs_cell_i_of_n_with_an_eta_from_the_cells_computed_so_far(tmp_path, monkeypatch, caplog) -> None:
    """The first cell is done already (skipped, not timed); each computed cell takes 10 s (fake clock)."""
    clock = FakeClock()
    monkeypatch.setattr(executors, "time", SimpleNamespace(perf_counter=clock))

    def fake_cell(cell, config, study, run_dir, tracker_log=None) -> dict:
        done = (run_dir / "cells" / cell.method / cell.key / "metrics.json").exists()
        clock.now += 0 if done else 10
        return {"balanced_accuracy": 0.5, "macro_auc": 0.5}

    monkeypatch.setattr(executors, "run_cell", fake_cell)
    monkeypatch.setattr(experiment, "summarize_fidelity", lambda *a, **k: None)
    monkeypatch.setattr(experiment, "summarize_run", lambda *a, **k: {})
    config = load_config("smoke", ["run.methods=[real]"])
    done = tmp_path / "cells" / "real" / "fold0_seed0" / "metrics.json"
    done.parent.mkdir(parents=True)
    done.write_text("{}")
    caplog.set_level(logging.INFO)
    experiment.run_study(config, tmp_path, build_html=False)
    cells = [m for m in lines(caplog, "busynth.executors") if m.startswith("cell ")]
    n = len(cells)
    assert n >= 2 and cells[0] == f"cell 1/{n}: real fold0_seed0 (done)"
    assert cells[1].startswith(f"cell 2/{n}: real ") and "ETA" not in cells[1]  # nothing timed yet
    for i, line in enumerate(cells[2:], start=3):
        assert line.endswith(f", ETA {format_duration(10 * (n - i + 1))}"), line


# --- the CLI's handler ---------------------------------------------------------------------------


@pytest.fixture
def cli_logging(monkeypatch):
    """Set up the CLI's logging (stderr is not a terminal under pytest); restore the root logger after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.setenv("TQDM_DISABLE", "")  # restored after; setup_logging sets it only when absent
    monkeypatch.delenv("TQDM_DISABLE")
    setup_logging(False)
    yield
    logging.captureWarnings(False)
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("cli_logging")
def test_off_a_terminal_each_message_is_one_plain_full_width_line(capsys) -> None:
    long = "word " * 60
    logging.getLogger("busynth.experiment").info("cell 1/4: %s", long.strip())
    logging.getLogger("busynth.experiment").info("cell 2/4: again")
    err = capsys.readouterr().err.splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    assert re.fullmatch(rf"{stamp} INFO busynth\.experiment: cell 1/4: {long.strip()}", err[0])
    assert re.fullmatch(rf"{stamp} INFO busynth\.experiment: cell 2/4: again", err[1])  # time repeated
    assert len(err) == 2


@pytest.mark.usefixtures("cli_logging")
def test_warnings_and_library_messages_go_through_the_handler_minus_the_harmless_ones(capsys) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a deprecated thing", UserWarning, stacklevel=1)
    logging.getLogger("transformers.utils.import_utils").warning(
        "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`")
    logging.getLogger("diffusers.loaders.lora_base").warning("No LoRA keys associated to CLIPTextModel found")
    logging.getLogger("diffusers.models").warning("a real diffusers problem")
    err = capsys.readouterr().err
    assert re.search(r"WARNING py\.warnings: .*UserWarning: a deprecated thing", err)
    assert err.count("a real diffusers problem") == 1 and "WARNING diffusers.models: a real" in err
    assert "torchvision" not in err and "No LoRA keys" not in err


def test_a_fresh_process_shows_no_transformers_or_diffusers_noise() -> None:
    """Importing diffusers' SD pipeline (which makes transformers warn about torchvision) and running a
    library tqdm bar, with the CLI's logging set up first and stderr not a terminal: nothing but what
    the script logs itself, in the plain format."""
    script = (
        "import logging; from busynth.logs import setup_logging; setup_logging(False)\n"
        "from diffusers import StableDiffusionPipeline\n"
        "from transformers.utils import logging as tl\n"
        "list(tl.tqdm(range(3), desc='Loading weights'))\n"
        "tl.get_logger('transformers.modeling_utils').warning('visible once')\n"
        "logging.getLogger('busynth.x').info('done')\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TQDM_DISABLE"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False,
                            env={**env, "OMP_NUM_THREADS": "1"}, cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stderr
    err = result.stderr.splitlines()
    assert [re.sub(r"^\S+ \S+ ", "", line) for line in err] == [
        "WARNING transformers.modeling_utils: visible once", "INFO busynth.x: done"], result.stderr
