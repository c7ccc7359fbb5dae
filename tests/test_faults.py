"""Faults: SIGKILL inside every stage and then the same command again; a full or read-only disk.

Every case runs the CLI in a child process that dies by a real SIGKILL (no ``finally``, no
atexit). To make the kill point random *and* reproducible, and to be sure it lands inside the
stage under test, the child watches its own writes with a Python audit hook
(``sys.addaudithook``): each write under the output folder -- a file opened for writing, a
rename, a new or removed folder, a safetensors file -- is an event, numbered per path (temporary
names normalised). The uninterrupted reference run records its events; a case draws one event of
its stage from an RNG seeded with the stage's name and the child SIGKILLs itself just before that
event. Between two events nothing on disk changes but the file being written, so these are all
the states a kill can leave behind, except a file caught half-written: a kill at a safetensors
write (whose Rust writer gets its event from a wrapper) may therefore "tear" it, writing half the
bytes before dying. A few fixed kill points, run one after the other, cover the known hazards. The
same hook can instead make writes fail with ENOSPC or EROFS, like a full or read-only disk.

A stage is redone on a copy of the finished reference run with that stage's outputs (and what
is computed from them) removed, so a case pays only for its own stage and the report. Children
are forked from one server process that imported busynth once: an import costs 5-10 s on two
cores, a fork a few milliseconds. ``BUSYNTH_FAULT_SEED=<n>`` draws other kill points.
"""

from __future__ import annotations

import csv
import errno
import fnmatch
import hashlib
import importlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CELL = "fold0_seed0"  # holdout split: one fold, one seed
GENERATORS = ("classical", "cvae", "sd-lora", "controlnet")
# The smoke preset on one holdout fold, with fewer synthetic images and training steps (the report,
# rebuilt by every rerun, draws every synthetic image) and checkpoints inside the diffusion stages.
LEAN = {"synthesis.ratio": 0.25, "generators.sd-lora.autoencoder_training.steps": 10,
        "generators.sd-lora.base_training.steps": 12, "generators.sd-lora.base_training.checkpoint_every": 6,
        "generators.sd-lora.lora_training.steps": 8, "generators.controlnet.training.steps": 8,
        "generators.controlnet.training.checkpoint_every": 4}
RUN_ARGS = ("--config", "smoke", "--set", "split.mode=holdout", "--methods", ",".join(("real", *GENERATORS)),
            *(arg for field, value in LEAN.items() for arg in ("--set", f"{field}={value}")))
RESULTS = ("results", "report.html")
SEED = os.environ.get("BUSYNTH_FAULT_SEED", "0")

# --- the fork server and its children (runs in its own interpreter: keep the imports lazy) ------

EVENTS = {"open", "os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "shutil.copyfile",
          "shutil.copytree", "safetensors.save_file"}
REMOVALS = {"os.remove", "os.rmdir", "shutil.rmtree", "os.rename"}  # still work on a full disk
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# io.atomic_path / write_dir_atomic: ".<name>.<12 random hex digits>.tmp[.old]"
TEMP_NAME = re.compile(r"^(\..+\.)[0-9a-f]{12}(\.tmp(?:\.old)?)$")


def normalize(rel: str) -> str:
    """A run-relative path with the random part of temporary names replaced by ``*``."""
    return "/".join(TEMP_NAME.sub(r"\1*\2", part) for part in rel.split(os.sep))


def _written_path(event: str, args: tuple) -> str | None:
    """The path an audit event writes, or None when the event does not write."""
    if event == "open":
        path, mode, flags = args
        if isinstance(path, int):
            return None
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITE_FLAGS)
        return os.fsdecode(path) if writes else None
    if event in ("os.rename", "shutil.copyfile", "shutil.copytree"):
        return os.fsdecode(args[1])
    return os.fsdecode(args[0])


_TEAR = [False]  # set by the hook: the next safetensors write is cut in half by a SIGKILL


def _watch_writes(root: str, trace: str | None, kill: dict | None, fail: dict | None) -> None:
    """Install the audit hook of a child: record the writes under ``root``, SIGKILL before the one
    ``kill["at"]`` names (or in the middle of it: ``kill["tear"]``), or make them fail (``fail``)."""
    prefixes = tuple({os.path.join(os.path.abspath(root), ""), os.path.join(os.path.realpath(root), "")})
    trace_fd = os.open(trace, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if trace else None
    counts: dict[tuple[str, str], int] = {}
    failing = [fail is not None and fail.get("from") is None]

    def hook(event: str, args: tuple) -> None:
        if event not in EVENTS:
            return
        path = _written_path(event, args)
        if path is None or not (path := os.path.abspath(path)).startswith(prefixes):
            return
        rel = normalize(path[len(next(p for p in prefixes if path.startswith(p))):])
        n = counts[event, rel] = counts.get((event, rel), 0) + 1
        if trace_fd is not None:
            os.write(trace_fd, (json.dumps([event, rel, n]) + "\n").encode())
        if kill is not None and kill["at"] == [event, rel, n]:
            if kill.get("tear") and event == "safetensors.save_file":
                _TEAR[0] = True
                return
            os.kill(os.getpid(), signal.SIGKILL)
        if fail is not None:
            failing[0] = failing[0] or fail["from"] == [event, rel, n]
            if failing[0] and (fail["errno"] == errno.EROFS or event not in REMOVALS):
                raise OSError(fail["errno"], os.strerror(fail["errno"]), path)

    sys.addaudithook(hook)


def _child(request: dict) -> None:
    """Run one CLI command in this (forked) process and exit with its code; never returns."""
    import resource
    import traceback

    import busynth.cli

    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    if request.get("fsize"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize"], request["fsize"]))
    if request.get("root"):
        _watch_writes(request["root"], request.get("trace"), request.get("kill"), request.get("fail"))
    code = 0
    try:
        busynth.cli.app(args=request["argv"], prog_name="busynth")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:  # noqa: BLE001 -- what `python -m busynth` does: traceback, exit 1
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve() -> None:
    """Fork server: import busynth once, then run each JSON request from stdin in a forked child
    and answer with its exit code (negative: killed by that signal)."""
    import safetensors.torch

    save_file = safetensors.torch.save_file

    def audited_save_file(tensors, filename, metadata=None):  # the Rust writer raises no audit event itself
        sys.audit("safetensors.save_file", filename)
        if _TEAR[0]:  # killed in the middle of this write: half of its bytes reach the disk
            data = safetensors.torch.save(tensors, metadata)
            with open(filename, "wb") as fh:
                fh.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return save_file(tensors, filename, metadata)

    safetensors.torch.save_file = audited_save_file  # before anything does `from safetensors.torch import`
    for module in ("busynth.cli", "busynth.experiment", "busynth.report", "busynth.generators.classical",
                   "busynth.generators.cvae", "busynth.generators.diffusion.controlnet"):
        importlib.import_module(module)  # once, here: every child starts warm

    replies = os.fdopen(os.dup(1), "w")  # the protocol; anything printed goes to stderr instead
    os.dup2(2, 1)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        deadline = time.monotonic() + request["timeout"]
        while not (status := os.waitpid(pid, os.WNOHANG))[0]:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                status = os.waitpid(pid, 0)
                break
            time.sleep(0.005)
        replies.write(json.dumps({"rc": os.waitstatus_to_exitcode(status[1])}) + "\n")
        replies.flush()


@dataclass
class Outcome:
    """How a child ended: exit code (negative: killed by that signal) and its stdout + stderr."""

    rc: int
    log: str

    @property
    def tail(self) -> str:
        return self.log[-3000:]


class ForkServer:
    """Client of ``serve()`` running in a fresh interpreter with one thread for torch."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "160"}
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                "import test_faults; test_faults.serve()")
        with (folder / "server.log").open("w") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log, text=True, env=env, cwd=folder)

    def run(self, argv: list[str], log: Path, *, root: Path | None = None, trace: Path | None = None,
            kill: dict | None = None, fail: dict | None = None, fsize: int | None = None,
            timeout: float = 300) -> Outcome:
        """Run ``busynth <argv>`` in a forked child; ``root``: the folder whose writes ``trace``
        records, ``kill`` names the write to die at, ``fail`` makes writes fail; ``fsize``: RLIMIT_FSIZE."""
        request = {"argv": argv, "log": str(log), "root": str(root) if root else None, "timeout": timeout,
                   "trace": str(trace) if trace else None, "kill": kill, "fail": fail, "fsize": fsize}
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            raise RuntimeError(f"the fork server died:\n{(self.folder / 'server.log').read_text()[-3000:]}")
        return Outcome(json.loads(reply)["rc"], log.read_text(errors="replace"))

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# --- stages -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One stage of a command: the writes it makes, the file it writes last, and how to redo it."""

    name: str
    command: str  # run, audit or split
    writes: tuple[str, ...]  # fnmatch patterns (``*`` crosses ``/``) of the output-relative paths it writes
    finished: str  # exists only once the stage has finished
    redo: tuple[str, ...] = ()  # globs removed from a copy of the finished reference to make `run` redo it
    hazards: tuple[Hazard, ...] = ()  # fixed kill points, one per run, instead of one random kill


@dataclass(frozen=True)
class Hazard:
    """A fixed kill point: the ``index``-th write event of type ``event`` whose path matches ``path``
    in the reference run; ``tear``: die in the middle of that (safetensors) write."""

    event: str
    path: str
    index: int = 0
    tear: bool = False


def generator_stage(method: str, hazards: tuple[Hazard, ...] = (), name: str | None = None) -> Stage:
    return Stage(name or method, "run", (f"generators/{method}/*",), f"generators/{method}/{CELL}/generator.json",
                 (f"generators/{method}", f"synthetic/{method}", f"cells/{method}", *RESULTS), hazards)


CLASSIFIER = Stage("classifier", "run", (f"cells/real/{CELL}/classifier/*",), f"cells/real/{CELL}/metrics.json",
                   ("cells/real", *RESULTS))
EVALUATION = ("fidelity.json", "adherence.json", "memorization.csv", "closest")
STAGES = [
    Stage("audit", "audit", ("*",), "audit.json"),
    Stage("split", "split", ("*",), "split.csv"),
    CLASSIFIER,
    *(generator_stage(m) for m in GENERATORS),
    Stage("synthesize", "run", ("synthetic/controlnet/*",), f"synthetic/controlnet/{CELL}/done.json",
          ("synthetic/controlnet", "cells/controlnet", *RESULTS)),
    Stage("report", "run", (*(f"cells/*/{f}*" for f in EVALUATION), "results/*", "report.html"), "report.html",
          (*(f"cells/*/{CELL}/{f}" for f in EVALUATION), *RESULTS)),
    # One sd-lora fit killed four times, each rerun getting further: in the middle of writing the
    # autoencoder's weights (config.json was written first) and the LoRA's (non-atomic writes used to
    # leave a folder that looked finished); with model/ moved away but the new one not yet in place;
    # inside the LoRA stage before its checkpoint (a restart must draw the same initial LoRA).
    generator_stage("sd-lora", (
        Hazard("safetensors.save_file", "generators/sd-lora/*/model/*vae*/diffusion_pytorch_model.safetensors",
               tear=True),
        Hazard("os.rename", f"generators/sd-lora/{CELL}/model"),
        Hazard("open", f"generators/sd-lora/{CELL}/stages/lora/.history.csv.*"),
        Hazard("safetensors.save_file", "generators/sd-lora/*lora*/pytorch_lora_weights.safetensors", tear=True),
    ), "sd-lora-hazards"),
    # Killed while writing the last history.csv, before the final checkpoint commits the run.
    Stage("classifier-last-history", "run", CLASSIFIER.writes, CLASSIFIER.finished, CLASSIFIER.redo,
          (Hazard("open", f"cells/real/{CELL}/classifier/.history.csv.*", index=-1),)),
]


def command_argv(command: str, out: Path, busi: Path) -> list[str]:
    """The CLI arguments of ``command`` writing into ``out``."""
    if command == "audit":
        return ["data", "audit", str(busi), "--config", "smoke", "--out", str(out)]
    if command == "split":
        return ["data", "split", str(busi), "--config", "smoke", "--set", "split.mode=holdout",
                "--out", str(out / "split.csv")]
    return ["run", *RUN_ARGS, "--out", str(out)]


def read_trace(path: Path) -> list[list]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def kill_points(trace: list[list], stage: Stage) -> list[dict]:
    """Where to die, one point per run: the stage's hazards, else one write drawn from the stage's
    writes by an RNG seeded with the stage name (and BUSYNTH_FAULT_SEED); a drawn safetensors
    write is torn half of the time."""
    points = []
    for hazard in stage.hazards:
        matches = [e for e in trace if e[0] == hazard.event and fnmatch.fnmatchcase(e[1], hazard.path)]
        assert matches, f"{stage.name}: the reference run made no {hazard.event} write matching {hazard.path}"
        points.append({"at": matches[hazard.index], "tear": hazard.tear})
    if not stage.hazards:
        candidates = [e for e in trace if any(fnmatch.fnmatchcase(e[1], p) for p in stage.writes)]
        assert candidates, f"{stage.name}: the reference run made no write matching {stage.writes}"
        rng = random.Random(f"{stage.name}/{SEED}")
        at = rng.choice(candidates)
        points.append({"at": at, "tear": at[0] == "safetensors.save_file" and rng.random() < 0.5})
    return points


@dataclass
class Reference:
    """The uninterrupted runs: the BUSI-layout input and, per command, its output folder and trace."""

    busi: Path
    outputs: dict[str, tuple[Path, list[list]]]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    fork_server = ForkServer(tmp_path_factory.mktemp("fork-server"))
    yield fork_server
    fork_server.close()


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory) -> Reference:
    return make_reference(server, tmp_path_factory.mktemp("reference"))


def make_reference(server: ForkServer, base: Path) -> Reference:
    """The phantom in the BUSI layout, then each command once, uninterrupted, with its writes traced."""
    busi = base / "busi"
    made = server.run(["data", "phantom", str(busi), "--config", "smoke"], base / "phantom.log")
    assert made.rc == 0, made.tail
    outputs = {}
    for command in ("audit", "split", "run"):
        out = base / command / command  # the same folder name as in the cases (report.html shows it)
        out.mkdir(parents=True)
        done = server.run(command_argv(command, out, busi), base / f"{command}.log", root=out,
                          trace=base / f"{command}.trace")
        assert done.rc == 0, done.tail
        outputs[command] = (out, read_trace(base / f"{command}.trace"))
    return Reference(busi, outputs)


# --- comparing folders ----------------------------------------------------------------------------

# Wall-clock times, and where diffusers loaded a model from (a resumed fit reloads its autoencoder).
VARYING_KEYS = {"seconds", "started", "_name_or_path"}
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\+00:00)?")


def result_files(root: Path) -> dict[str, Path]:
    """Every file under ``root`` but temporary ones, by relative path."""
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*"))
            if p.is_file() and not any(TEMP_NAME.match(part) for part in p.relative_to(root).parts)}


def _scrub(value):
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if k not in VARYING_KEYS}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return _scrub(json.loads(value))
        except ValueError:
            return value
    return value


def _safetensors_parts(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def comparable(path: Path, roots: tuple[Path, ...]):
    """The content of a result file without wall-clock times and with the run folders ``roots``
    replaced (a case works on a copy of the reference, so its files may name either)."""
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        header, body = _safetensors_parts(data)
        return _scrub(header), hashlib.sha256(body).hexdigest()
    if path.suffix not in (".json", ".jsonl", ".csv", ".html", ".yaml", ".txt"):
        return hashlib.sha256(data).hexdigest()
    text = data.decode()
    for root in roots:
        text = text.replace(str(root), "<RUN>")
    if path.suffix == ".json":
        return _scrub(json.loads(text))
    if path.suffix == ".jsonl":
        return [_scrub(json.loads(line)) for line in text.splitlines()]
    if path.suffix == ".csv":
        rows = list(csv.reader(io.StringIO(text)))
        keep = [i for i, name in enumerate(rows[0]) if name not in VARYING_KEYS] if rows else []
        return [[row[i] for i in keep] for row in rows]
    return TIMESTAMP.sub("<TIME>", text)


def assert_same_results(reference: Path, rerun: Path, context: str = "") -> None:
    """Same files with the same content (images and weights byte for byte) as the reference;
    the message lists what differs, the folders upstream (generators, synthetic) first."""
    want, got = result_files(reference), result_files(rerun)
    assert sorted(got) == sorted(want), (f"{context}: missing {sorted(set(want) - set(got))[:10]}, "
                                         f"extra {sorted(set(got) - set(want))[:10]}")
    roots = (reference, rerun)
    differ = [rel for rel in want if comparable(want[rel], roots) != comparable(got[rel], roots)]
    differ.sort(key=lambda rel: (not rel.startswith(("data", "generators", "synthetic")), rel))
    assert not differ, f"{context}: {len(differ)} file(s) differ from the uninterrupted run: {differ[:12]}"


def assert_no_torn_files(root: Path) -> None:
    """Every file a reader may open (temporary names aside) is complete: JSON parses, a PNG ends
    with its IEND chunk, a safetensors file holds every byte its header promises, a CSV ends a line."""
    for rel, path in result_files(root).items():
        data = path.read_bytes()
        try:
            if path.suffix == ".json":
                json.loads(data)
            elif path.suffix == ".jsonl":
                [json.loads(line) for line in data.splitlines()]
            elif path.suffix == ".png":
                assert data.endswith(b"IEND\xaeB`\x82"), "no IEND chunk"
            elif path.suffix == ".safetensors":
                header, body = _safetensors_parts(data)
                ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
                assert len(body) == max(ends, default=0), "shorter than its header says"
            elif path.suffix == ".csv":
                assert data.endswith(b"\n"), "does not end a line"
        except (AssertionError, ValueError) as exc:
            raise AssertionError(f"{rel} is incomplete after the kill: {exc}") from None


def copy_without(source: Path, target: Path, globs: tuple[str, ...]) -> None:
    """Copy ``source`` to ``target``, then delete what ``globs`` match there."""
    shutil.copytree(source, target)
    for pattern in globs:
        for path in target.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def fresh_copy(reference: Reference, stage: Stage, folder: Path) -> tuple[Path, Path, list[list]]:
    """(work folder, reference folder, reference trace) for ``stage``: a copy of the finished reference
    without the stage's outputs, or an empty folder for a command that only has this stage."""
    ref_out, trace = reference.outputs[stage.command]
    work = folder / ref_out.name
    if stage.redo:
        copy_without(ref_out, work, stage.redo)
    else:
        work.mkdir()
    return work, ref_out, trace


def file_hashes(root: Path) -> dict[str, str]:
    return {rel: hashlib.sha256(p.read_bytes()).hexdigest() for rel, p in result_files(root).items()}


# --- the cases ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_sigkill_inside_a_stage_then_the_same_command_gives_the_uninterrupted_results(stage, server, reference,
                                                                                       tmp_path):
    work, ref_out, trace = fresh_copy(reference, stage, tmp_path)
    argv = command_argv(stage.command, work, reference.busi)
    where = stage.name
    for k, kill in enumerate(kill_points(trace, stage)):
        where = (f"{stage.name}: SIGKILL {'in the middle of' if kill['tear'] else 'before'} write {kill['at']} "
                 f"(BUSYNTH_FAULT_SEED={SEED})")
        killed = server.run(argv, tmp_path / f"killed{k}.log", root=work, kill=kill)
        assert killed.rc == -signal.SIGKILL, f"{where}: never got there (exit {killed.rc})\n{killed.tail}"
        assert not (work / stage.finished).exists(), f"{where}: {stage.finished} was already written"
        assert_no_torn_files(work)

    again = server.run(argv, tmp_path / "again.log")
    assert again.rc == 0, f"{where}: the rerun failed\n{again.tail}"
    assert_same_results(ref_out, work, where)


def _assert_clear_write_error(outcome: Outcome, work: Path, code: int) -> Path:
    """The command failed with exit code 2 and one message naming the file it could not write
    (not a temporary name), the reason and errno, and no traceback; returns the named path."""
    assert outcome.rc == 2, f"exit {outcome.rc}\n{outcome.tail}"
    assert "Traceback" not in outcome.log, outcome.tail
    text = " ".join(outcome.log.split())  # rich wraps long lines
    found = re.search(rf"error: cannot write (\S+): {re.escape(os.strerror(code))} \(errno {code}\); "
                      r"files already written are unchanged", text)
    assert found, outcome.tail
    named = Path(found.group(1))
    assert named.is_relative_to(work) and not any(TEMP_NAME.match(p) for p in named.parts), named
    return named


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["disk-full", "read-only"])
def test_a_full_or_read_only_disk_is_one_clear_error_and_keeps_what_was_written(code, server, reference, tmp_path):
    stage = generator_stage("cvae")
    work, ref_out, trace = fresh_copy(reference, stage, tmp_path)
    before = file_hashes(work)
    # Full: writes fail from a random write of the cvae fit on. Read-only: every write fails.
    fail = {"errno": code, "from": kill_points(trace, stage)[0]["at"] if code == errno.ENOSPC else None}
    argv = command_argv("run", work, reference.busi)

    failed = server.run(argv, tmp_path / "failed.log", root=work, fail=fail)
    _assert_clear_write_error(failed, work, code)
    after = file_hashes(work)
    assert {rel: after.get(rel) for rel in before} == before, "a file written before was changed"
    assert_no_torn_files(work)
    assert not [p for p in work.rglob(".*") if TEMP_NAME.match(p.name)], "temporary files left behind"
    if code == errno.ENOSPC:  # space again: the same command finishes as if nothing had happened
        again = server.run(argv, tmp_path / "again.log")
        assert again.rc == 0, again.tail
        assert_same_results(ref_out, work)


def test_a_file_size_limit_hit_inside_the_safetensors_writer_is_one_clear_error(server, reference, tmp_path):
    """A real kernel write error (RLIMIT_FSIZE: EFBIG) raised inside safetensors' Rust writer,
    which reports it as SafetensorError, not OSError."""
    work, _, _ = fresh_copy(reference, generator_stage("cvae"), tmp_path)
    before = file_hashes(work)
    failed = server.run(command_argv("run", work, reference.busi), tmp_path / "failed.log", fsize=200_000)
    named = _assert_clear_write_error(failed, work, errno.EFBIG)
    assert named.is_relative_to(work / "generators" / "cvae"), named
    after = file_hashes(work)
    assert {rel: after.get(rel) for rel in before} == before, "a file written before was changed"
    assert_no_torn_files(work)


def test_atomic_writes_get_the_permissions_the_umask_gives_plain_files(tmp_path: Path) -> None:
    from busynth.io import write_atomic, write_dir_atomic

    old = os.umask(0o027)
    try:
        path = write_atomic(tmp_path / "a.json", lambda tmp: tmp.write_text("{}"))
        folder = write_dir_atomic(tmp_path / "model", lambda tmp: (tmp / "w.bin").write_bytes(b"x"))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640  # group-readable on a shared file system, not 0600
    assert folder.stat().st_mode & 0o777 == 0o750
