"""The ``busynth`` command line: thin wrappers, one library call per command."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from busynth.config import StudyConfig, is_plain_name
from busynth.errors import BusynthError, ConfigError, RunStateError
from busynth.logs import setup_logging
from busynth.presets import build_config, dump_config, load_config
from busynth.registry import study_arms

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
log = logging.getLogger("busynth.cli")

ConfigOpt = Annotated[str, typer.Option("--config", "-c", help="Preset name (smoke, cpu) or a YAML file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config field, e.g. --set classifier.epochs=5 (repeatable)."),
]
DataArg = Annotated[str, typer.Argument(help="Data set folder in the BUSI layout, or 'phantom' for built-in data.")]
ExternalOpt = Annotated[list[str] | None, typer.Option(
    "--external", help="NAME=PATH: a test set from another hospital (BUSI layout, may lack classes) that every "
    "classifier scores; never trained on (repeatable).")]


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
    setup_logging(verbose, console)


@app.command()
@friendly_errors
def run(
    data: Annotated[str | None, typer.Option(help="BUSI-layout folder; default: built-in phantom data.")] = None,
    config: Annotated[str | None, typer.Option(
        "--config", "-c", help="Preset name (demo, smoke, cpu, sd15) or a YAML file; default: demo on the "
        "built-in data, cpu with --data.")] = None,
    methods: Annotated[str | None, typer.Option(help="Comma-separated methods, e.g. real,classical.")] = None,
    folds: Annotated[int | None, typer.Option(help="Number of grouped folds.")] = None,
    seeds: Annotated[int | None, typer.Option(help="Seeds per fold.")] = None,
    split_file: Annotated[Path | None, typer.Option(help="Use this split CSV instead of making one.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/<config>-<data>).")] = None,
    synthetic_from: Annotated[Path | None, typer.Option(
        help="Another run folder: reuse its finished generator fits and synthetic sets (same images, "
        "split, synthesis and method settings, else refused) instead of fitting them again.")] = None,
    tracker: Annotated[str | None, typer.Option(help="none, wandb or tensorboard (local CSV/JSON always).")] = None,
    external: ExternalOpt = None,
    executor: Annotated[str | None, typer.Option(
        help="local (this process) or ray (cells as Ray tasks; any number of workers may share --out).")] = None,
    address: Annotated[str | None, typer.Option(
        help="Ray cluster to connect to (auto, ray://host:10001); default: start a local one.")] = None,
    workers: Annotated[int | None, typer.Option(help="Ray: cells at once on the local Ray instance.")] = None,
    set_: SetOpt = None,
) -> None:
    """Run the study (resumes in the same --out folder): every fold x seed x method, then the report."""
    external_sets = parse_external(external or [])
    method_list = None if methods is None else "[" + ",".join(m.strip() for m in methods.split(",") if m.strip()) + "]"
    data_path = _data_path(data)
    if config is None:
        config = "cpu" if data_path else "demo"
        log.info("config: %s preset (%s; choose another with --config)", config,
                 "a BUSI-size data set" if data_path else "built-in data, a miniature of the study")
    cfg = _config(config, set_, **{"run.methods": method_list, "split.folds": folds, "run.seeds": seeds,
                                    "run.tracker": tracker, "run.executor": executor, "run.ray_address": address,
                                    "run.workers": workers})
    if out is None:
        out = Path("runs") / f"{Path(config).stem}-{data_path.name if data_path else 'phantom'}"
    if cfg.run.executor == "ray":
        from busynth.cluster import start_ray

        start_ray(cfg)  # before the study code is imported: Ray's workers boot and import it meanwhile
    from busynth.experiment import run_study
    from busynth.results import format_summary

    summary = run_study(cfg, out, data_path, split_file, external=external_sets, synthetic_from=synthetic_from)
    typer.echo(format_summary(summary))
    _echo_label_fidelity(out)
    _echo_external(out, external_sets)
    typer.echo(f"\nrun folder: {out}\nreport: {out / 'report.html'}")


def parse_external(specs: Sequence[str]) -> dict[str, Path]:
    """``NAME=PATH`` options as {name: folder}; a ConfigError names the bad option."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise ConfigError(f"--external {spec!r}: expected NAME=PATH, e.g. busbra=../shared/data/BUS-BRA-dev")
        if not is_plain_name(name) or name.startswith("."):
            raise ConfigError(f"--external {spec!r}: the name {name!r} must be a plain file name (no path)")
        if name in out:
            raise ConfigError(f"--external {spec!r}: the name {name!r} is given twice")
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"--external {spec!r}: {folder} is not a folder")
        out[name] = folder
    return out


def _echo_label_fidelity(run_dir: Path) -> None:
    from busynth.io import read_json

    path = Path(run_dir) / "results" / "fidelity.json"
    fidelity = read_json(path) if path.is_file() else {}
    if cas := fidelity.get("cas"):
        typer.echo("\ntrain on synthetic, test on real (CAS): balanced accuracy of a classifier trained on a "
                   "generator's images alone (real-only classifier of the same cells in brackets)")
        for method, entry in cas.items():
            mine, real = entry["synthetic_only"]["balanced_accuracy"], entry["real_only"]["balanced_accuracy"]
            typer.echo(f"  {method:<12} {mine['mean']:.3f} ± {mine['sd']:.3f} ({real['mean']:.3f}), "
                       f"cells={entry['cells']}")
    for method, entry in (fidelity.get("filter") or {}).items():
        typer.echo(f"\nfilter {method} (intended class p >= {entry['threshold']}): kept "
                   + ", ".join(f"{c} {v['kept']}/{v['requested']} ({v['passed']} of {v['sampled']} passed)"
                               for c, v in entry["per_class"].items()))
    labels = fidelity.get("label_fidelity", {})
    if not labels:
        return
    typer.echo("\nlabel fidelity: share of a generator's images the fold's real-only classifier puts in the "
               "intended class (real test images in brackets)")
    for method, entry in labels.items():
        parts = [f"{c} {v['accuracy']['mean']:.2f} "
                 f"({entry['real_test'].get(c, {}).get('accuracy', {}).get('mean', float('nan')):.2f})"
                 for c, v in entry["synthetic"].items() if c != "overall"]
        typer.echo(f"  {method:<12} " + ", ".join(parts))


def _echo_external(run_dir: Path, names: Iterable[str]) -> None:
    from busynth.io import read_json
    from busynth.results import format_summary

    for name in names:
        summary = read_json(Path(run_dir) / "results" / "external" / f"{name}.json")
        ext = summary["external"]
        typer.echo(f"\nexternal set {name} ({ext['n_images']} images: {', '.join(ext['classes_present'])}; "
                   f"resampled by {ext['duplicate_groups']} duplicate groups):")
        if ext.get("called_absent_class"):
            typer.echo(f"scored among {', '.join(ext['scored_among'])} (run.external_classes=present); images called "
                       "an absent class: " + ", ".join(f"{m} {v:.0%}" for m, v in ext["called_absent_class"].items()))
        typer.echo(format_summary(summary))


@app.command()
@friendly_errors
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A run folder of `busynth run`.")],
    external: ExternalOpt = None,
    external_classes: Annotated[
        str | None,
        typer.Option(help="Score a set that lacks classes among those it has ('present') or all ('all'); "
                          "default: the run's run.external_classes."),
    ] = None,
) -> None:
    """Score a finished run's classifiers on external test sets (nothing is trained), then rebuild the report."""
    from busynth.external import evaluate_external
    from busynth.report import build_report
    from busynth.results import Protocol
    from busynth.rundir import run_config, run_records

    sets = parse_external(external or [])
    if not sets:
        raise ConfigError("busynth evaluate: give at least one --external NAME=PATH")
    if not (run_dir / "results" / "summary.json").is_file():
        raise RunStateError(f"{run_dir} is not a finished run folder (results/summary.json is written by busynth run)")
    cfg = run_config(run_dir)
    if external_classes is not None:
        data = cfg.model_dump(mode="json")
        data["run"]["external_classes"] = external_classes
        cfg = build_config(data, "--external-classes")
    evaluate_external(run_dir, cfg, sets,
                      study_arms(cfg.run.methods, cfg.synthesis.ratios, cfg.synthesis.filter is not None),
                      Protocol.from_config(cfg.run),
                      run_records(run_dir, cfg))
    build_report(run_dir)
    _echo_external(run_dir, sets)
    typer.echo(f"\nreport: {run_dir / 'report.html'}")


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
    from busynth.io import write_json
    from busynth.rundir import load_records

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
    from busynth.rundir import load_records

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
    from busynth.data.busi import write_busi_layout
    from busynth.data.phantom import make_phantom

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
    classes: Annotated[str | None, typer.Option(
        help="Comma-separated classes (default: all the generator knows).")] = None,
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
