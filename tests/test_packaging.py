"""The transformers floor: setup.cfg's lower bound is what `make test-floor` installs and tests.

`make test-floor` builds `.venv-floor` with `transformers==<setup.cfg's transformers>= bound>` and runs the library's
own tests there (it sets DIVERSE_VIT_HF_TRANSFORMERS_FLOOR), so the lowest version we claim is the one CI runs.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def _install_requires() -> list[Requirement]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg", encoding="utf-8")
    lines = config["options"]["install_requires"].splitlines()
    return [Requirement(line.strip()) for line in lines if line.strip() and not line.strip().startswith("#")]


def _transformers_requirement() -> Requirement:
    matches = [req for req in _install_requires() if req.name == "transformers"]
    assert len(matches) == 1, f"setup.cfg install_requires names transformers {len(matches)} times"
    return matches[0]


def _declared_floor() -> str:
    floors = [spec.version for spec in _transformers_requirement().specifier if spec.operator == ">="]
    assert len(floors) == 1, "setup.cfg must give transformers exactly one `>=` lower bound (the tested floor)"
    return floors[0]


def test_setup_cfg_bounds_transformers_from_below_and_above():
    specifier = _transformers_requirement().specifier
    floor = Version(_declared_floor())
    assert floor in specifier
    assert any(spec.operator == "<" for spec in specifier), "transformers needs an upper bound (next major)"


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_makefile_floor_is_the_setup_cfg_bound():
    # Evaluate the Makefile's own variable (no recipe runs): a second makefile read from stdin prints it.
    printer = "print-transformers-floor:\n\t@echo $(TRANSFORMERS_FLOOR)\n"
    result = subprocess.run(
        ["make", "--no-print-directory", "-s", "-f", "Makefile", "-f", "-", "print-transformers-floor"],
        cwd=ROOT,
        input=printer,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == _declared_floor()


def test_installed_transformers_satisfies_setup_cfg():
    installed = version("transformers")
    assert Version(installed) in _transformers_requirement().specifier, (
        f"transformers {installed} is outside setup.cfg's {_transformers_requirement()}"
    )


@pytest.mark.skipif(
    not os.environ.get("DIVERSE_VIT_HF_TRANSFORMERS_FLOOR"), reason="only in the floor run (make test-floor)"
)
def test_floor_run_uses_exactly_the_declared_floor():
    expected = os.environ["DIVERSE_VIT_HF_TRANSFORMERS_FLOOR"]
    assert Version(expected) == Version(_declared_floor())
    assert Version(version("transformers")) == Version(expected)
