"""Run a module or script with tracemalloc on; each SIGUSR1 dumps a snapshot to DIR/<n>.snap.

    python bench/traced.py DIR runflare_server serve --port P ...      (a module)
    python bench/traced.py DIR bench/echo_server.py P                   (a script)
"""

from __future__ import annotations

import itertools
import runpy
import signal
import sys
import tracemalloc
from pathlib import Path


def main() -> None:
    out, target = Path(sys.argv[1]), sys.argv[2]
    sys.argv = [target, *sys.argv[3:]]
    counter = itertools.count()

    def dump(*_: object) -> None:
        path = out / f"{next(counter)}.snap"
        tracemalloc.take_snapshot().dump(str(path) + ".part")
        Path(str(path) + ".part").rename(path)

    signal.signal(signal.SIGUSR1, dump)
    tracemalloc.start(8)
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
