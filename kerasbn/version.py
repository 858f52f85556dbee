"""`kerasbn.__version__`: the version of the installed distribution."""

from __future__ import annotations

import importlib.metadata

try:
    __version__ = importlib.metadata.version("kerasbn")
except importlib.metadata.PackageNotFoundError:
    # A source tree on sys.path that pip never installed: no metadata to read.
    __version__ = "0+unknown"
