"""The ``busynth`` command line: thin wrappers, one library call per command."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler

from busynth.accel import is_main_process
from busynth.config import StudyConfig, dump_config, load_config
from busynth.errors import BusynthError, ConfigError

app = typer.Typer(
    help="Does synthetic training data help a breast-ultrasound classifier? Train generators, "
    "classifiers on real + synthetic images, and score them on held-out real images.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Data steps: audit, split, write the built-in phantom.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console(stderr=True)

ConfigOpt = Annotated[str, typer.Option("--config", "-c", help="Preset name (smoke, cpu) or a YAML file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config field, e.g. --set classifier.epochs=5 (repeatable)."),
]
DataArg = Annotated[str, typer.Argument(help="Data set folder in the BUSI layout, or 'phantom' for built-in data.")]


def _setup_logging(verbose: bool) -> None:
    # Under `accelerate launch` the other processes do the same work: only the main one narrates.
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(
        level=level if is_main_process() else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, markup=False)],
        force=True,
    )
    for noisy in ("PIL", "matplotlib", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Print user-facing errors as one red message (exit code 2) instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except BusynthError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None
        except OSError as exc:  # disk full, read-only folder, permissions: name the file
            console.print(f"[bold red]error:[/] {os_error_message(exc)}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper


def os_error_message(exc: OSError) -> str:
    """One line for an OSError that reached the CLI: a failed write (busynth.io.WRITE_ERRNOS) as
    'cannot write <path>: <reason> (errno N); ...' like OutputWriteError, anything else with its
    reason, errno and file."""
    from busynth.io import write_error

    if exc.filename is not None and (error := write_error(exc.filename, exc)) is not None:
        return str(error)
    reason = exc.strerror or str(exc)
    code = f" (errno {exc.errno})" if exc.errno is not None else ""
    return f"{reason}{code}: {exc.filename}" if exc.filename is not None else f"{reason}{code}"


def _data_path(data: str | None) -> Path | None:
    if data is None or data == "phantom":
        return None
    path = Path(data)
    if not path.exists():
        raise ConfigError(f"--data {data}: no such folder")
    return path


def _config(config: str, overrides: list[str] | None, **fields: Any) -> StudyConfig:
    """Load a preset/file, apply --set overrides, then the dedicated CLI options given."""
    extra = [f"{k}={v}" for k, v in fields.items() if v is not None]
    return load_config(config, [*(overrides or []), *extra])


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    """busynth command line."""
    _setup_logging(verbose)


@app.command()
@friendly_errors
def run(
    data: Annotated[str | None, typer.Option(help="BUSI-layout folder; default: built-in phantom data.")] = None,
    config: ConfigOpt = "cpu",
    methods: Annotated[str | None, typer.Option(help="Comma-separated methods, e.g. real,classical.")] = None,
    folds: Annotated[int | None, typer.Option(help="Number of grouped folds.")] = None,
    seeds: Annotated[int | None, typer.Option(help="Seeds per fold.")] = None,
    split_file: Annotated[Path | None, typer.Option(help="Use this split CSV instead of making one.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/<config>-<data>).")] = None,
    tracker: Annotated[str | None, typer.Option(help="none, wandb or tensorboard (local CSV/JSON always).")] = None,
    set_: SetOpt = None,
) -> None:
    """Run the study (resumes in the same --out folder): every fold x seed x method, then the report."""
    from busynth.experiment import run_study
    from busynth.results import format_summary

    method_list = None if methods is None else "[" + ",".join(m.strip() for m in methods.split(",") if m.strip()) + "]"
    cfg = _config(config, set_, **{"run.methods": method_list, "split.folds": folds, "run.seeds": seeds,
                                    "run.tracker": tracker})
    data_path = _data_path(data)
    if out is None:
        out = Path("runs") / f"{Path(config).stem}-{data_path.name if data_path else 'phantom'}"
    summary = run_study(cfg, out, data_path, split_file)
    typer.echo(format_summary(summary))
    typer.echo(f"\nrun folder: {out}\nreport: {out / 'report.html'}")


@data_app.command("audit")
@friendly_errors
def data_audit(
    path: DataArg,
    out: Annotated[Path, typer.Option(help="Folder for audit.json and load_summary.json.")] = Path("runs/audit"),
    config: ConfigOpt = "cpu",
    set_: SetOpt = None,
) -> None:
    """Find unreadable files, exact and near duplicates, cross-class duplicates and overlays."""
    from busynth.data.audit import audit_records
    from busynth.experiment import load_records
    from busynth.io import write_json

    cfg = _config(config, set_)
    records, summary, _ = load_records(cfg, _data_path(path))
    report = audit_records(records, cfg.audit, load=summary)
    if summary is not None:
        write_json(out / "load_summary.json", summary)
    write_json(out / "audit.json", report.to_dict())
    typer.echo(report.format())
    typer.echo(f"written: {out / 'audit.json'}")


@data_app.command("split")
@friendly_errors
def data_split(
    path: DataArg,
    out: Annotated[Path, typer.Option(help="Split CSV to write.")] = Path("runs/split.csv"),
    folds: Annotated[int | None, typer.Option(help="Number of grouped folds.")] = None,
    holdout: Annotated[float | None, typer.Option(help="Single holdout split with this test share.")] = None,
    seed: Annotated[int | None, typer.Option(help="Split seed.")] = None,
    keep_cross_class: Annotated[bool, typer.Option(help="Keep cross-class duplicates (excluded by default).")] = False,
    config: ConfigOpt = "cpu",
    set_: SetOpt = None,
) -> None:
    """Write a stratified group k-fold (or holdout) split that keeps duplicate groups together."""
    from busynth.data.audit import audit_records
    from busynth.data.splits import make_split
    from busynth.experiment import load_records

    fields: dict[str, Any] = {"split.folds": folds, "split.seed": seed}
    if holdout is not None:
        fields |= {"split.mode": "holdout", "split.test_fraction": holdout}
    if keep_cross_class:
        fields["split.exclude_cross_class"] = "false"
    cfg = _config(config, set_, **fields)
    records, summary, _ = load_records(cfg, _data_path(path))
    split = make_split(records, audit_records(records, cfg.audit, load=summary), cfg.split)
    split.write(out)
    typer.echo(split.format(cfg.data.classes))
    typer.echo(f"written: {out}")


@data_app.command("phantom")
@friendly_errors
def data_phantom(
    out: Annotated[Path, typer.Argument(help="Folder to write the phantom data set into (BUSI layout).")],
    config: ConfigOpt = "cpu",
    set_: SetOpt = None,
) -> None:
    """Write the built-in simulated data set in the BUSI folder layout."""
    from busynth.data.phantom import make_phantom, write_busi_layout

    cfg = _config(config, set_)
    records = make_phantom(cfg.phantom, cfg.data.classes)
    write_busi_layout(records, out)
    typer.echo(f"wrote {len(records)} images with masks to {out}")


@app.command()
@friendly_errors
def report(run_dir: Annotated[Path, typer.Argument(help="A run folder made by 'busynth run'.")]) -> None:
    """(Re)build report.html from the files of a run folder, without training anything."""
    from busynth.report import build_report

    typer.echo(f"written: {build_report(run_dir)}")


@app.command()
@friendly_errors
def generate(
    method: Annotated[str, typer.Argument(help="Generator method, e.g. cvae.")],
    checkpoint: Annotated[Path, typer.Option(help="A fitted generator folder.")],
    n: Annotated[int, typer.Option(help="Images per class.")] = 100,
    out: Annotated[Path, typer.Option(help="Output folder (data set layout + manifest.jsonl).")] = Path("generated"),
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    classes: Annotated[str | None, typer.Option(help="Comma-separated classes (default: all the generator knows).")] = None,
) -> None:
    """Sample images per class from a fitted generator, in the data set's own layout."""
    from busynth.generators import generator_class
    from busynth.generators.base import write_samples

    if n <= 0:
        raise ConfigError(f"--n must be positive, got {n}")
    if not checkpoint.is_dir():
        raise ConfigError(f"--checkpoint {checkpoint}: no such folder")
    gen = generator_class(method).load(checkpoint)
    wanted = [c.strip() for c in classes.split(",") if c.strip()] if classes else gen.classes
    if not wanted:
        raise ConfigError(f"--classes {classes!r}: names no class")
    if unknown := [c for c in wanted if c not in gen.classes]:
        raise ConfigError(f"--classes: {', '.join(unknown)} not among the classes of {checkpoint} "
                          f"({', '.join(gen.classes)})")
    for k, label in enumerate(wanted):
        write_samples(gen.sample(label, n, seed=seed * 1000 + k), out, method, checkpoint)
    typer.echo(f"wrote {n * len(wanted)} images to {out}")


@app.command("config")
@friendly_errors
def show_config(config: ConfigOpt = "cpu", set_: SetOpt = None) -> None:
    """Print the resolved config (preset + overrides) as YAML."""
    typer.echo(dump_config(_config(config, set_)))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
