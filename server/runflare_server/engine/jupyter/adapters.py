"""Per-kernel-family behaviour, in one place: ipykernel (and other Python kernels), Deno, bash_kernel, and
any other kernelspec.

``adapter_for(argv, language)`` picks a family from a kernelspec's argv and language; the kernel pool
(start-up flags, fork server), the sandbox (the ipc<->tcp bridge), the provisioner (launch environment) and
kernel runs (version probe, set-up cell, code wrapping, exit status, late output) all ask it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import subprocess
import sys
from collections.abc import Sequence
from typing import Any, ClassVar

from runflare_server.engine.interface import RunRequest


class KernelAdapter:
    """Any kernelspec: no start-up flags, ipc transport, the code run as given, output drained after idle."""

    family: ClassVar[str] = "generic"
    tcp_only: ClassVar[bool] = False  # cannot use the ipc transport: runs behind the in-sandbox bridge
    drains_after_idle: ClassVar[bool] = True  # may publish output after its idle status (Deno's console)

    def __init__(self, argv: Sequence[str], language: str = "") -> None:
        self.argv = list(argv)
        self.language = language or ""

    @classmethod
    def claims(cls, argv: Sequence[str], language: str) -> bool:
        """Whether a kernelspec with this argv and language belongs to this family."""
        return True

    def lean_args(self) -> list[str]:
        """Flags appended to the kernelspec's argv for a faster, quieter start."""
        return []

    @property
    def forkable(self) -> bool:
        """Whether the ipykernel fork server can start this kernel."""
        return False

    def launch_env(self, env: dict[str, str]) -> dict[str, str]:
        """The kernel's environment from the spec's; ``PYTHONEXECUTABLE`` is dropped for Python kernels, as
        jupyter_client's ``KernelProvisionerBase`` does."""
        if self.language.lower().startswith("python"):
            env.pop("PYTHONEXECUTABLE", None)
        return env

    def version_name(self, label: str, display_name: str) -> str:
        """A Judge0-style language name with the kernel's real versions; the spec's display name here."""
        return f"{label} ({display_name})"

    def preamble(self, request: RunRequest, source_file: str) -> str | None:
        """A silent set-up cell run before the code (stdin, argv, output cap), or None."""
        return None

    def setup(self, request: RunRequest, source_file: str) -> dict[str, Any] | None:
        """The set-up the kernel does itself at the start of the code's own execute request (sent as its
        ``metadata["runflare_setup"]``; the warm-up cell installed what reads it), or None. Where a family
        has one, it needs no preamble: the run costs the kernel one request, not two."""
        return None

    def warmup(self) -> str | None:
        """A silent, side-effect-free cell run while the kernel waits in the pool, so that a run's first
        execution does not pay the kernel's first-execution costs (lazy imports, copy-on-write faults of a
        forked kernel); None for none."""
        return None

    def code(self, request: RunRequest) -> str:
        """The code to execute for a submission."""
        return request.source_code

    def exit_status(self, error: dict[str, Any]) -> int | None:
        """The program's exit status when an ``error`` message carries one (not a failure), else None."""
        return None


class PythonKernel(KernelAdapter):
    """ipykernel, and any kernelspec whose language is Python (the IPython kernel protocol's extras)."""

    family = "python"
    drains_after_idle = False
    LEAN_ARGS: ClassVar[list[str]] = ["--HistoryManager.enabled=False", "--InteractiveShell.colors=NoColor",
                                      "--IPKernelApp.quiet=True"]

    @classmethod
    def claims(cls, argv: Sequence[str], language: str) -> bool:
        return language == "python" or "ipykernel_launcher" in argv or "ipykernel" in argv

    def lean_args(self) -> list[str]:
        return list(self.LEAN_ARGS) if "ipykernel_launcher" in self.argv else []

    @property
    def forkable(self) -> bool:
        """ipykernel of this very interpreter (the fork server has imported its ipykernel)."""
        return len(self.argv) >= 3 and self.argv[0] == sys.executable and self.argv[1:3] == ["-m", "ipykernel_launcher"]

    def version_name(self, label: str, display_name: str) -> str:
        if "ipykernel_launcher" in self.argv or "ipykernel" in self.argv:
            v = _run([self.argv[0], "-c", "import sys, ipykernel; print(ipykernel.__version__, sys.version.split()[0])"])
            parts = v.split()
            if len(parts) == 2:
                return f"{label} (IPython kernel {parts[0]}, Python {parts[1]})"
        return super().version_name(label, display_name)

    def setup(self, request: RunRequest, source_file: str) -> dict[str, Any] | None:
        return python_setup(request, source_file, request.stdin_queue is not None)

    def warmup(self) -> str | None:
        return PYTHON_WARMUP


class DenoKernel(KernelAdapter):
    """``deno jupyter``: TCP only (bridged), stdin and args set up by a preamble, console output after idle."""

    family = "deno"
    tcp_only = True

    @classmethod
    def claims(cls, argv: Sequence[str], language: str) -> bool:
        return bool(argv) and os.path.basename(argv[0]).startswith("deno")

    def version_name(self, label: str, display_name: str) -> str:
        lines = _run([self.argv[0], "--version"]).splitlines()
        vers = dict(line.split()[:2] for line in lines if len(line.split()) >= 2)
        if "deno" in vers:
            extra = f", TypeScript {vers['typescript']}" if label == "TypeScript" and "typescript" in vers else ""
            return f"{label} (Deno kernel {vers['deno']}{extra})"
        return super().version_name(label, display_name)

    def preamble(self, request: RunRequest, source_file: str) -> str | None:
        return deno_preamble(request, request.stdin_queue is not None)


class BashKernel(KernelAdapter):
    """bash_kernel: stdin and argv around the program, its exit status reported as an ``error``."""

    family = "bash"

    @classmethod
    def claims(cls, argv: Sequence[str], language: str) -> bool:
        return language == "bash" or "bash_kernel" in argv

    def version_name(self, label: str, display_name: str) -> str:
        if "bash_kernel" in self.argv:
            bk = _run([self.argv[0], "-c", "import bash_kernel; print(bash_kernel.__version__)"])
            m = re.search(r"version (\d+\.\d+\.\d+)", _run(["bash", "--version"]))
            if bk:
                return f"{label} (bash_kernel {bk}, Bash {m.group(1) if m else '?'})"
        return super().version_name(label, display_name)

    def code(self, request: RunRequest) -> str:
        """The program in a subshell, so that ``exit n`` ends it (not the kernel's shell) with status n, with
        its argv (``set --``) and stdin (a here-document)."""
        if self.language != "bash":
            return request.source_code
        args = " ".join(shlex.quote(a) for a in shlex.split(request.command_line_arguments or ""))
        stdin = request.stdin or ""
        if stdin and not stdin.endswith("\n"):
            stdin += "\n"
        end = "RF_STDIN_" + secrets.token_hex(8)
        return f"(\nset -- {args}\n{request.source_code}\n) <<'{end}'\n{stdin}{end}"

    def exit_status(self, error: dict[str, Any]) -> int | None:
        """bash_kernel reports a failing command as an error with no name whose value is its status."""
        evalue = str(error.get("evalue", ""))
        if not error.get("ename", "") and not error.get("traceback") and re.fullmatch(r"-?\d+", evalue.strip()):
            return int(evalue) & 0xFF
        return None


FAMILIES: tuple[type[KernelAdapter], ...] = (DenoKernel, PythonKernel, BashKernel)


def adapter_for(argv: Sequence[str], language: str = "") -> KernelAdapter:
    """The adapter of a kernelspec, by its argv and language (the generic one when no family claims it)."""
    for family in FAMILIES:
        if family.claims(argv, language):
            return family(argv, language)
    return KernelAdapter(argv, language)


def _run(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        return (out.stdout or out.stderr).strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


SETUP_ERROR = "RunflareSetupError"  # the ename of a Python kernel whose set-up failed (its code did not run)

# The set-up of Python kernel runs. The warm-up cell defines it, while the kernel waits in its pool, in a
# module of its own (never the user's namespace), and installs ``_rf_hook`` as IPython's first input
# transformer (a documented extension point). The hook reads the run's set-up from its execute request's
# metadata and calls ``_rf_setup`` once, before anything of the cell is transformed or run. If the set-up
# fails, every transform of that request raises RunflareSetupError: IPython reports it as the cell's error
# and the code does not run. No set-up cell, no compile of this text on the path of a run.
PYTHON_SETUP = r'''class RunflareSetupError(Exception):
    """The run's set-up failed in the kernel; its code was not run."""


def _rf_install():
    import sys
    from IPython import get_ipython
    shell = get_ipython()
    failures = {}  # execute request id -> the set-up's error (None: done)

    def _rf_hook(lines):
        parent = shell.kernel.get_parent("shell") or {}
        setup = (parent.get("metadata") or {}).get("runflare_setup")
        if setup is None:
            return lines
        key = (parent.get("header") or {}).get("msg_id")
        if key not in failures:
            try:
                _rf_setup(**setup)
                failures[key] = None
            except Exception as e:
                failures[key] = "%s: %s" % (type(e).__name__, e)
        if failures[key] is not None:
            raise RunflareSetupError(failures[key])
        return lines

    _rf_hook.has_side_effects = True  # never run by IPython's is-complete checks
    shell.input_transformers_cleanup.insert(0, _rf_hook)
    sys.modules.pop("_rf_setup", None)


def _rf_setup(data, argv, interactive, cap):
    import builtins, getpass, io, sys, warnings
    from IPython import get_ipython
    warnings.filterwarnings("ignore", message="To exit: use")
    kernel = get_ipython().kernel
    if interactive:
        ask = kernel.raw_input
        class _Stdin(io.TextIOBase):
            def readable(self):
                return True
            def readline(self, size=-1):
                try:
                    return ask("") + "\n"
                except EOFError:
                    return ""
            def read(self, size=-1):
                return "".join(iter(self.readline, ""))
        sys.stdin = _Stdin()
    else:
        sys.stdin = io.StringIO(data)
        def _input(prompt=""):
            if prompt:
                print(prompt, end="", flush=True)
            line = sys.stdin.readline()
            if not line:
                raise EOFError("EOF when reading a line")
            return line[:-1] if line.endswith("\n") else line
        kernel.raw_input = _input
        kernel.getpass = lambda prompt="Password: ", stream=None: _input(prompt)
        builtins.input = _input  # the kernel forwarded input() to its own before the cell was transformed
        getpass.getpass = kernel.getpass
    sys.argv = argv
    get_ipython().user_ns["__file__"] = argv[0]
    # Output cap inside the kernel too: past it, writes stop here instead of piling up in the
    # kernel's buffers (the server cuts at the cap and kills the kernel).
    left = [cap + 1]
    def capped(write, flush):
        def w(text, *args, **kwargs):
            if left[0] <= 0:
                import time
                while True:
                    time.sleep(1)
            text = text[: left[0]]
            left[0] -= len(text)
            n = write(text, *args, **kwargs)
            if left[0] <= 0:
                flush()
            return n
        return w
    shell = get_ipython()
    if hasattr(shell, "_tee"):
        # IPython 9 re-patches stream.write around every cell (and keeps a copy of all output in memory
        # for its history): the cap goes in at the same place, and nothing is kept (a kernel is used once)
        import contextlib
        @contextlib.contextmanager
        def _tee(channel):
            stream = getattr(sys, channel)
            original = stream.write
            stream.write = capped(original, stream.flush)
            try:
                yield
            finally:
                stream.write = original
        shell._tee = _tee
    else:
        for s in (sys.stdout, sys.stderr):
            s.write = capped(s.write, s.flush)
'''

PYTHON_WARMUP = (
    "__import__('sys').modules['_rf_setup'] = __import__('types').ModuleType('_rf_setup')\n"
    f"exec({PYTHON_SETUP!r}, __import__('sys').modules['_rf_setup'].__dict__)\n"
    "__import__('sys').modules['_rf_setup']._rf_install()\n"
)


def python_setup(request: RunRequest, source_file: str, interactive: bool) -> dict[str, Any]:
    """What ``_rf_setup`` (``PYTHON_SETUP``) is called with: sys.stdin (whole and via input()), sys.argv,
    __file__, the output cap."""
    return {"data": request.stdin or "", "argv": [source_file, *shlex.split(request.command_line_arguments or "")],
            "interactive": interactive, "cap": request.limits.max_output_bytes}


def deno_preamble(request: RunRequest, interactive: bool) -> str:
    """Silent set-up cell for Deno: Deno.args, and stdin readable whole (Deno.stdin) and by prompt()."""
    args = json.dumps(shlex.split(request.command_line_arguments or ""))
    setup = f"Object.defineProperty(Deno, 'args', {{ value: {args}, configurable: true }});"
    if interactive:  # prompt() asks the client through input_request
        return "{ " + setup + " }"
    return "{ " + setup + """
  const data = new TextEncoder().encode(%s);
  let pos = 0;
  const take = (p) => { const n = Math.min(p.length, data.length - pos); p.set(data.subarray(pos, pos + n)); pos += n; return n; };
  const stdin = {
    read(p) { return Promise.resolve(pos >= data.length ? null : take(p)); },
    readSync(p) { return pos >= data.length ? null : take(p); },
    get readable() { return new ReadableStream({ pull(c) { if (pos < data.length) { c.enqueue(data.slice(pos)); pos = data.length; } else { c.close(); } } }); },
    isTerminal() { return false; }, close() {}, setRaw() {},
  };
  Object.defineProperty(Deno, "stdin", { value: stdin, configurable: true });
  globalThis.prompt = (msg) => {
    if (msg) { Deno.jupyter.broadcast("stream", { name: "stdout", text: msg + " " }); }
    if (pos >= data.length) { return null; }
    let j = data.indexOf(10, pos);
    if (j < 0) { j = data.length; }
    const line = new TextDecoder().decode(data.subarray(pos, j));
    pos = Math.min(j + 1, data.length);
    return line;
  };
}""" % json.dumps(request.stdin or "")
