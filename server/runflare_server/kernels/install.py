"""Install one Jupyter kernelspec per available program language ("C (Run-Flare)" → ``runflare-c``).

``python -m runflare_server.kernels.install [--prefix DIR | --user]`` or ``install_kernelspecs(prefix)``.
By default the specs go under this interpreter's prefix (``sys.prefix``; in a virtual environment, the
environment's own ``share/jupyter/kernels``), as ``ipykernel install --sys-prefix`` does.
Every spec launches the same Run-Flare kernel; its env ``RUNFLARE_LANGUAGE`` picks the default language.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager

from runflare_server.engine.runs import languages as langs


def kernelspec_json(lang: langs.Language) -> dict:
    """The kernel.json of one language's kernelspec."""
    display = lang.name.split(" (")[0]
    return {
        "argv": [sys.executable, "-m", "runflare_server.kernels", "-f", "{connection_file}"],
        "display_name": f"{display} (Run-Flare)",
        "language": lang.kernelspec.removeprefix("runflare-"),
        "env": {"RUNFLARE_LANGUAGE": str(lang.id)},
        "metadata": {"runflare": {"language_id": lang.id}},
    }


def install_kernelspecs(prefix: str | None = None, user: bool = False) -> list[str]:
    """Install a kernelspec for each available program language; returns the installed spec names.

    Into ``PREFIX/share/jupyter/kernels`` (default ``sys.prefix``), or the user's data dir with ``user``.
    """
    if user and prefix:
        raise ValueError("user and prefix are exclusive")
    if not user and prefix is None:
        prefix = sys.prefix
    ksm = KernelSpecManager()
    names = []
    for lang in langs.LANGUAGES:
        if not langs.available(lang):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp) / lang.kernelspec
            d.mkdir()
            (d / "kernel.json").write_text(json.dumps(kernelspec_json(lang), indent=1))
            ksm.install_kernel_spec(str(d), lang.kernelspec, user=user, prefix=prefix)
        names.append(lang.kernelspec)
    return names


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--prefix", help="install into PREFIX/share/jupyter/kernels (default: sys.prefix)")
    where.add_argument("--user", action="store_true", help="install into the user's Jupyter data directory")
    a = p.parse_args(argv)
    for name in install_kernelspecs(a.prefix, a.user):
        print(name)


if __name__ == "__main__":
    main()
