#!/usr/bin/env python
"""Fetch transformers' own model test suite (`ModelTesterMixin`) for the installed transformers version.

`tests/test_hf_common.py` runs the checks every transformers model must pass (save/load round trips, hidden
states and attention outputs, training, gradient checkpointing, head masking, torch.export, ...) against
`DiverseViTForImageClassification` and `DiverseDeiTForImageClassification`. Those checks live in the transformers
*source* distribution, not in the installed wheel, so `make test` fetches the sdist of exactly the installed
version from the package registry and keeps `tests/test_modeling_common.py` of it:

    python tests/fetch_hf_model_tests.py .venv/hf-model-tests

The result is a package `hf_model_tests/` in that folder. Two modules the suite imports but that concern only
generative and exportable-to-other-runtimes models are replaced by empty mixins. The folder is written under a
temporary name and renamed into place once complete.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

MEMBER = "tests/test_modeling_common.py"
# Imported by test_modeling_common.py; their mixins test generation and ExecuTorch export, which an image
# classifier does not have.
STUBS = {
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
}
PACKAGE = "hf_model_tests"


def fetched_version(target: Path) -> str | None:
    """The transformers version whose model tests `target` holds, or None."""
    package = target / PACKAGE
    if not (package / "test_modeling_common.py").is_file() or not (package / "VERSION").is_file():
        return None
    return (package / "VERSION").read_text().strip()


def fetch(target: Path, version: str = transformers.__version__) -> Path:
    """Write `target/hf_model_tests/` from the transformers `version` sdist; returns the package folder."""
    package = target / PACKAGE
    if fetched_version(target) == version:
        return package
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target) as scratch:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        command += ["--dest", scratch, f"transformers=={version}"]
        result = subprocess.run(command, capture_output=True, text=True)
        archives = list(Path(scratch).glob("transformers-*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise SystemExit(
                f"Could not download the transformers {version} source distribution (needed for its model test "
                f"suite): {result.stderr.strip()[-500:] or 'no archive'}. Check the network access to the package "
                "registry, or run the tests without tests/test_hf_common.py."
            )
        staged = Path(scratch) / PACKAGE
        with tarfile.open(archives[0]) as archive:
            name = f"transformers-{version}/{MEMBER}"
            source = archive.extractfile(name)
            if source is None:
                raise SystemExit(f"{archives[0].name} has no {name}.")
            staged.mkdir()
            (staged / "test_modeling_common.py").write_bytes(source.read())
        for relative, text in STUBS.items():
            path = staged / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.parent / "__init__.py").touch()
            path.write_text(text)
        (staged / "__init__.py").touch()
        (staged / "VERSION").write_text(version + "\n")
        if package.exists():
            shutil.rmtree(package)
        staged.rename(package)
    return package


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python tests/fetch_hf_model_tests.py TARGET_FOLDER")
    package = fetch(Path(argv[0]).resolve())
    print(f"transformers {transformers.__version__} model tests in {package}")


if __name__ == "__main__":
    main(sys.argv[1:])
