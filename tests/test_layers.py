"""The package's layers and its module boundaries, as CI checks them.

* ``lint-imports`` (import-linter) runs the contracts in pyproject.toml: the layers of
  ../shared/DESIGN.md (imports only point down) and no import cycle between the modules of
  any package. The tests also break each contract on purpose, in a copy of the package, to show
  that a violation fails.
* No module imports a private name (``_x``) of another module: what two modules share is public.
* ``ruff check`` (the version pinned in the test extras, settings in pyproject.toml) is clean over
  the package, the tests and the benchmarks; a file with a lint finding fails it.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "busynth"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
RUFF = Path(sys.executable).with_name("ruff")


def _lint_imports(package_parent: Path | None = None) -> subprocess.CompletedProcess:
    """Run the contracts of pyproject.toml on busynth (the copy under ``package_parent`` if given)."""
    env = {**os.environ, "NO_COLOR": "1"}
    if package_parent is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(package_parent), env.get("PYTHONPATH", "")])
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", str(ROOT / "pyproject.toml")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_the_import_contracts_hold() -> None:
    assert LINT_IMPORTS.is_file(), f"{LINT_IMPORTS} is missing: install the test extras (import-linter)"
    result = _lint_imports()
    assert result.returncode == 0, f"lint-imports failed:\n{result.stdout}\n{result.stderr}"
    assert "2 kept, 0 broken" in result.stdout, result.stdout


@pytest.mark.parametrize(("module", "line", "broken", "expected"), [
    # config is below generators (which import it): the import breaks the layers and makes a cycle.
    ("config.py", "import busynth.generators", 2, "busynth.config -> busynth.generators"),
    # records and busi are in one layer; records importing busi closes a cycle (busi imports records).
    ("data/records.py", "import busynth.data.busi", 1, ".records -> .busi"),
], ids=["layer", "cycle"])
def test_a_deliberate_violation_fails(tmp_path: Path, module: str, line: str, broken: int, expected: str) -> None:
    copy = tmp_path / "busynth"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.yaml"))
    target = copy / module
    target.write_text(target.read_text() + f"\n{line}  # a deliberate violation\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    assert f"{broken} broken" in result.stdout and expected in result.stdout, result.stdout


def private_imports(path: Path) -> list[str]:
    """``from x import _y`` statements of a Python file (dunder names such as __version__ are
    public), as ``"file:line: from x import _y"``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    source = "." * node.level + (node.module or "")
                    found.append(f"{path}:{node.lineno}: from {source} import {alias.name}")
    return found


def test_no_module_imports_a_private_name_of_another() -> None:
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "bench").glob("*.py")]
    assert len(files) > 40
    found = [hit for f in sorted(files) for hit in private_imports(f)]
    assert not found, "private names imported across modules (make them public in one place):\n" + "\n".join(found)


def test_the_private_name_check_sees_one(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from busynth import __version__\nfrom busynth.io import _discard, write_text\n")
    assert private_imports(module) == [f"{module}:2: from busynth.io import _discard"]


def _ruff(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(RUFF), "check", "--no-cache", "--output-format", "concise", *map(str, paths)],
                          cwd=ROOT, env={**os.environ, "NO_COLOR": "1"}, capture_output=True, text=True,
                          timeout=120, check=False)


def test_ruff_is_clean() -> None:
    assert RUFF.is_file(), f"{RUFF} is missing: install the test extras (ruff)"
    result = _ruff(ROOT / "src", ROOT / "tests", ROOT / "bench")
    assert result.returncode == 0, f"ruff check found:\n{result.stdout}\n{result.stderr}"


def test_ruff_sees_a_finding(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import os\n")  # unused import (F401)
    result = _ruff(module)
    assert result.returncode != 0 and "F401" in result.stdout, result.stdout
