"""Where the packaged data lives; each lookup names the package to install when the data is missing."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from netshrink.errors import NetshrinkError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
JANEAUSTENR_DB = Path("/usr/lib/R/site-library/janeaustenr/data/Rdata")


def package_dir(package: str, install_hint: str) -> Path:
    """The folder of an installed Python package, without importing it (some pull in heavy or GUI code)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise NetshrinkError(f"Python package '{package}' is not installed", hint=install_hint)
    return Path(list(spec.submodule_search_locations)[0])


def gensim_test_data() -> Path:
    return package_dir("gensim", "pip install gensim") / "test" / "test_data"


def require(path: Path, install_hint: str) -> Path:
    if not path.exists():
        raise NetshrinkError("data file not found", where=str(path), hint=install_hint)
    return path
