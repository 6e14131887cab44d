"""`runflare serve`, `runflare run FILE`, `runflare languages`, `runflare install-kernels`,
`runflare kernels install [--sandboxed NAME]`."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from . import __version__
from .config import Settings, default_data_dir


def settings_epilog() -> str:
    """Every setting with its environment variable and default, for `runflare serve --help`."""
    lines = ["every setting (environment variable = default; lists and maps as JSON):"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        lines.append(f"  RUNFLARE_{name.upper()} = {json.dumps(default, default=str)}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runflare",
        description="Run-Flare: run untrusted code through managed Jupyter kernels behind a Judge0-compatible API. "
                    "Every setting can also come from a RUNFLARE_<NAME> environment variable.",
    )
    parser.add_argument("--version", action="version", version=f"runflare {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="start the server (embedded SQLite and in-process queue by default; "
                           "PostgreSQL and Redis to scale out)",
                           epilog=settings_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1, env RUNFLARE_HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8787, env RUNFLARE_PORT)")
    serve.add_argument("--data-dir", type=Path, help=f"where the database lives (default {default_data_dir()})")
    serve.add_argument("--sandbox", choices=["auto", "bwrap", "unshare", "none"],
                       help="how runs are isolated (default auto = bwrap; 'unshare' is weak and 'none' is for development, "
                            "both only when named)")
    serve.add_argument("--workers", type=int, help="concurrent runs (default: number of CPUs)")
    serve.add_argument("--role", choices=["all", "api", "worker"],
                       help="what this process does: all (default), api (HTTP and WebSocket) or worker (runs "
                            "submissions); api and worker share --store postgresql://... and --broker redis://...")
    serve.add_argument("--store", help="sqlite:///PATH (default: DATA_DIR/runflare.sqlite3) or postgresql://USER@HOST/DB")
    serve.add_argument("--broker", help="memory (default, one process) or redis://HOST:PORT/DB (shared)")
    serve.add_argument("--auth-token", action="append", dest="auth_tokens", metavar="TOKEN",
                       help="require X-Auth-Token on /api/v1 (repeatable)")
    serve.add_argument("--authz-user", action="append", dest="authz_users", metavar="TOKEN",
                       help="X-Auth-User tokens allowed to list and delete (repeatable)")
    serve.add_argument("--cors-origin", action="append", dest="cors_origins", metavar="ORIGIN",
                       help="allowed CORS origin: a URL, '*', or 'null' for pages opened from disk (repeatable)")
    serve.add_argument("--enable-submission-delete", action="store_true", default=None,
                       help="allow DELETE /submissions/{token}")
    serve.add_argument("--allow-enable-network", action="store_true", default=None,
                       help="let submissions ask for network access")
    serve.add_argument("--maintenance-mode", action="store_true", default=None, help="refuse new submissions")
    serve.add_argument("--max-queue-size", type=int, help="submissions allowed to wait (default 100)")
    serve.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")

    run = sub.add_parser("run", help="submit a file to a server and stream its output here", add_help=False)
    run.add_argument("args", nargs=argparse.REMAINDER)

    sub.add_parser("languages", help="list the program-run languages this machine can run (toolchains found)")
    install = sub.add_parser(
        "install-kernels", help="install the Run-Flare, bash and Deno kernelspecs",
        description="Install the kernelspecs into this environment (sys.prefix: a virtual environment's own "
                    f"share/jupyter/kernels; here {sys.prefix}), as `ipykernel install --sys-prefix` does.")
    where = install.add_mutually_exclusive_group()
    where.add_argument("--prefix", help="install under PREFIX/share/jupyter/kernels instead")
    where.add_argument("--user", action="store_true", help="install into the user's Jupyter data directory instead")

    kernels = sub.add_parser("kernels", help="install kernelspecs: Run-Flare's own, or sandboxed copies of any")
    kernels_sub = kernels.add_subparsers(dest="kernels_command", metavar="ACTION")
    kinstall = kernels_sub.add_parser(
        "install", help="install kernelspecs (default: as install-kernels; --sandboxed NAME: a sandboxed copy)",
        description="Without --sandboxed: the Run-Flare, bash and Deno kernelspecs, as `runflare install-kernels`. "
                    "With --sandboxed NAME: a copy of the installed kernelspec NAME, called NAME-sandboxed and "
                    "shown as '<display name> (sandboxed)', that JupyterLab, Notebook 7, nbclient or any "
                    "KernelManager start inside the Run-Flare sandbox with limits (the runflare-sandbox kernel "
                    f"provisioner), with no Run-Flare server running. Into sys.prefix ({sys.prefix}) by default.")
    kinstall.add_argument("--sandboxed", action="append", metavar="NAME", default=[],
                          help="the installed kernelspec to copy, e.g. python3 (repeatable)")
    kinstall.add_argument("--name", help="the sandboxed copy's name (default NAME-sandboxed; one --sandboxed only)")
    kinstall.add_argument("--memory-limit", type=int, metavar="KB", help="the kernel's memory limit in KB")
    kinstall.add_argument("--max-processes", type=int, dest="max_processes_and_or_threads", metavar="N",
                          help="processes and threads the kernel may have")
    kinstall.add_argument("--max-file-size", type=int, metavar="KB", help="largest file the kernel may write, in KB")
    kinstall.add_argument("--cpu-time-limit", type=float, metavar="S", help="CPU seconds per process (0: none)")
    kwhere = kinstall.add_mutually_exclusive_group()
    kwhere.add_argument("--prefix", help="install under PREFIX/share/jupyter/kernels instead")
    kwhere.add_argument("--user", action="store_true", help="install into the user's Jupyter data directory instead")
    return parser


def install_kernels(args: argparse.Namespace) -> int:
    """`runflare install-kernels` and `runflare kernels install`."""
    where = {"user": args.user, "prefix": args.prefix}
    sandboxed = getattr(args, "sandboxed", [])
    if not sandboxed:
        from runflare_server.engine.runs.kernel_runs import install_kernelspecs as install_third_party

        from .kernels.install import install_kernelspecs as install_runflare

        for line in [*install_runflare(**where), *install_third_party(**where)]:
            print(line)
        return 0
    from runflare_server.engine.jupyter.provisioner import install_sandboxed

    if args.name and len(sandboxed) > 1:
        print("runflare: --name goes with a single --sandboxed NAME", file=sys.stderr)
        return 2
    config = {key: getattr(args, key) for key in ("memory_limit", "max_processes_and_or_threads", "max_file_size",
                                                  "cpu_time_limit") if getattr(args, key) is not None}
    for name in sandboxed:
        try:
            print(install_sandboxed(name, new_name=args.name, config=config, **where))
        except KeyError:
            print(f"runflare: no kernelspec named {name!r} is installed (see `jupyter kernelspec list`)",
                  file=sys.stderr)
            return 2
    return 0


def settings_from(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        key: value for key, value in vars(args).items()
        if key in Settings.model_fields and value is not None
    }
    return Settings(**overrides)


async def serve(settings: Settings) -> None:
    from .service import Service

    service = Service(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await service.start()
        settle_heap()
        await stop.wait()
        logging.getLogger("runflare").info("stopping: draining running submissions")
    finally:
        await service.stop()


def settle_heap() -> None:
    """Move what start-up built (modules, the app, the engine, the pool's first kernels) out of the
    collector's reach: a full collection then walks only what runs made since, a few ms instead of the
    40-70 ms that stalled every live event on this machine (docs/benchmarks.md, stop 27). Cycles among
    these objects that die later (the first pool kernels' managers) are never collected: a fixed cost,
    paid once."""
    gc.collect()
    gc.freeze()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:  # the terminal client (runflare_nb) is its own program; the server never imports it
        os.execv(sys.executable, [sys.executable, "-m", "runflare_nb.terminal", *argv[1:]])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        # Sandboxes run this interpreter by its path: one they cannot walk ("bench/../.venv/bin/python", through
        # a directory they do not show) would fail every kernel start
        sys.executable = os.path.abspath(sys.executable)
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            settings = settings_from(args)
        except ValidationError as exc:
            for err in exc.errors():
                name = "RUNFLARE_" + str(err["loc"][0]).upper() if err["loc"] else "settings"
                print(f"runflare: bad setting {name}: {err['msg']}", file=sys.stderr)
            return 2
        asyncio.run(serve(settings))
        return 0
    if args.command == "languages":
        from .engine.manager import detect_languages

        for lang in detect_languages():
            print(f"{lang.id:>5}  {lang.name}")
        return 0
    if args.command == "install-kernels" or (args.command == "kernels" and args.kernels_command == "install"):
        return install_kernels(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
