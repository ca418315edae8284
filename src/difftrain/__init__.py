"""difftrain: train diffusion models from one Kubernetes manifest."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("difftrain")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"
