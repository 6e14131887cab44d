"""The ``runflare`` command: ``runflare run`` is the terminal client (runflare_nb), the rest is the server.

This launcher is the only module that knows both sides: the client side (``runflare_nb``) and the server
side (``runflare_server``) never import each other. A client-only install (``pip install runflare``) has
``runflare run``; the server's commands need ``pip install "runflare[server]"``.
"""

from __future__ import annotations

import sys

SERVER_COMMANDS = ("serve", "languages", "install-kernels", "kernels")

CLIENT_ONLY_HELP = """usage: runflare COMMAND ...

Run-Flare (client side only).

commands:
  run FILE     submit a file to a Run-Flare server and stream its output here (runflare run --help)

The server's commands ({commands}) need the server side: pip install "runflare[server,kernels]"
({error})
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:  # the terminal client parses its own options
        from runflare_nb.terminal import main as run_main

        return run_main(argv[1:])
    try:
        from runflare_server.cli import main as server_main
    except ImportError as exc:  # a client-only install: the server's dependencies are absent
        help_asked = not argv or argv[0] in ("-h", "--help")
        print(CLIENT_ONLY_HELP.format(commands=", ".join(SERVER_COMMANDS), error=exc),
              file=sys.stdout if help_asked else sys.stderr, end="")
        return 0 if help_asked else 2
    return server_main(argv)
