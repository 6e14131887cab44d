"""Run-Flare: untrusted code through managed Jupyter kernels, behind a Judge0-compatible API."""

__version__ = "0.1.0"
