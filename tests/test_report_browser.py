"""report.html of a small real run, rendered in headless Chromium: every image loads, no script
error, and a screenshot to look at (also copied to bench/results/report_screenshot.png).

Chromium is Debian's ``chromium`` package (``.ci/run`` installs it); nothing is downloaded. The
check script is injected into a copy of the page; ``--dump-dom`` prints the DOM after the load
event, including the script's verdict.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from busynth import cells, experiment, rundir
from busynth.evaluate.cell import evaluate_cell
from busynth.evaluate.summary import summarize_fidelity
from busynth.presets import load_config
from busynth.registry import REFERENCE
from busynth.report import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT_COPY = Path(__file__).parents[1] / "bench" / "results" / "report_screenshot.png"
WIDTH = 1200
MAX_HEIGHT = 16000

# Records script and resource errors (capture phase sees failed <img> loads too) from the start,
# then after 'load' writes the verdict into <pre id="busynth-check">.
CHECK_SCRIPT = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(
  String(e.message || ('resource failed: ' + ((e.target && e.target.src) || '').slice(0, 80)))), true);
window.addEventListener('unhandledrejection', e => window.__errors.push('rejection: ' + String(e.reason)));
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 60));
  const out = document.createElement('pre');
  out.id = 'busynth-check';
  out.textContent = JSON.stringify({images: imgs.length, broken: broken, errors: window.__errors,
                                    height: document.documentElement.scrollHeight});
  document.body.appendChild(out);
});
</script>"""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get install -y chromium)"),
]


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-extensions", "--no-first-run", "--no-default-browser-check", "--hide-scrollbars",
           "--mute-audio", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def check_page(page: Path, profile: Path) -> dict:
    """Load a copy of ``page`` with the check script; returns its verdict (images, broken, errors, height)."""
    text = page.read_text()
    checked = page.with_name(f"{page.stem}.check.html")
    checked.write_text(text.replace("<head>", "<head>" + CHECK_SCRIPT, 1))
    proc = _chromium(profile, "--virtual-time-budget=10000", "--dump-dom", checked.as_uri())
    found = re.search(r'<pre id="busynth-check">(.*?)</pre>', proc.stdout, re.DOTALL)
    assert found, f"no verdict from chromium (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def screenshot(page: Path, out: Path, height: int, profile: Path) -> Path:
    """Screenshot of ``page`` at WIDTH x height pixels; returns ``out``."""
    proc = _chromium(profile, f"--screenshot={out}", f"--window-size={WIDTH},{height}", page.as_uri())
    assert out.is_file() and out.stat().st_size > 0, f"no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return out


def test_the_check_itself_catches_a_broken_image_and_a_script_error(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head></head><body><img alt="gone" src="missing.png">'
                    '<script>throw new Error("boom")</script></body></html>')
    verdict = check_page(page, tmp_path / "profile")
    assert verdict["broken"] == ["gone"]
    assert any("boom" in e for e in verdict["errors"])


def _score_generator_cells(config, run_dir: Path) -> None:
    """Fidelity of every generator cell (a no-op where the runner already wrote fidelity.json)."""
    study = rundir.prepare_data(config, None, run_dir)
    for cell in experiment.study_cells(config, study.split.folds):
        if cell.method == REFERENCE:
            continue
        synthetic = cells.read_synthetic(run_dir / "synthetic" / cell.method / cell.key, cell.method)
        evaluate_cell(run_dir, cell.method, cell.fold, cell.seed, config,
                      study.split.select(study.records, cell.fold, "train"),
                      study.split.select(study.records, cell.fold, "test"), synthetic)
    summarize_fidelity(run_dir, config.run.methods)


def test_report_of_a_small_run_renders_in_chromium(tmp_path):
    config = load_config("smoke", ["run.methods=[real,classical]"])
    run_dir = tmp_path / "run"
    experiment.run_study(config, run_dir, build_html=False)
    _score_generator_cells(config, run_dir)
    report = build_report(run_dir)
    text = report.read_text()
    for heading in ("Fidelity, diversity and memorisation", "Closest synthetic", "image/mask pairs"):
        assert heading in text, f"section missing: {heading}"
    assert text.count('<figure class="pair') >= 2

    verdict = check_page(report, tmp_path / "profile")
    assert verdict["images"] >= 10
    assert verdict["broken"] == [], f"images that did not load: {verdict['broken']}"
    assert verdict["errors"] == [], f"errors on the page: {verdict['errors']}"

    height = min(int(verdict["height"]) + 20, MAX_HEIGHT)
    shot = screenshot(report, tmp_path / "report.png", height, tmp_path / "profile")
    SCREENSHOT_COPY.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT_COPY)
