"""Kernel runs: each submission runs inside a fresh, sandboxed Jupyter kernel from a warm pool.

Semantics (documented for the API):
- stdout/stderr are the kernel's ``stream`` messages; an uncaught exception's traceback (ANSI
  stripped) goes to stderr and gives exit_code 1; ``sys.exit(n)`` gives exit_code n.
- Rich outputs (display_data, execute_result) go to ``RunResult.outputs`` and are emitted as
  ``display`` events, never into stdout. A text/plain-only execute_result (a bare expression on the
  last line) is kept as an output too: stdout stays what ``python script.py`` would print.
- ``memory_limit`` applies to what the code allocates on top of the idle kernel: the kernel's
  processes move into a fresh cgroup when the run starts, and memory charged before (the kernel's
  ~50-80 MB baseline) stays outside. ``memory`` is the cgroup's peak of that (KB).
- ``time`` is the CPU the kernel's process tree used while the code ran; ``wall_time`` is the
  execute wall time.
- Output beyond ``max_output_bytes`` is cut and the kernel killed: exit_signal 25 (SIGXFSZ), message
  "output truncated ...". One kernel message larger than ``bounded_client.message_bound()`` (4x the
  server's output cap + 64 KiB) is refused by ZMQ before it is received or decoded: the run ends the
  same way, message "kernel output message exceeded N bytes".
- Limits: wall and CPU (cgroup cpuacct, else psutil) are watched every 50 ms and end the run with
  outcome "time_limit" (the kernel is killed, not interrupted: it is discarded anyway); memory and
  processes by the run's cgroup (OOM kill → exit_signal 9, "memory limit exceeded"); file size,
  stack and core size as rlimits set on the kernel's processes when the run starts.
- Every kernel starts through ``AsyncKernelManager`` and the ``runflare-sandbox`` provisioner (see
  ``kernel_pool.SandboxedKernel``). ipykernel kernels come from a fork server (ipykernel imported once,
  each kernel forked into fresh namespaces, see engine/sandbox/zygote.py) when bwrap is used as root; other
  kernelspecs, and runs with enable_network, get a bubblewrap of their own.
- stdin: Python sees it whole (sys.stdin) and by input(); other kernels get input_request answers
  (Deno's prompt()), bash a here-document around the program. argv: sys.argv / bash "$@".
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from runflare_server.engine.incidents import incident
from runflare_server.engine.interface import Emit, Event, LanguageInfo, RunRequest, RunResult
from runflare_server.engine.jupyter import bounded_client
from runflare_server.engine.jupyter.adapters import SETUP_ERROR
from runflare_server.engine.jupyter.kernel_pool import (
    ForkServer,
    KernelPool,
    KernelSpecInfo,
    SandboxedKernel,
    installed_kernelspecs,
    load_spec,
)
from runflare_server.engine.sandbox import kernel_sandbox as sb
from runflare_server.engine.sandbox import scratch
from runflare_server.engine.sandbox.process import scratch_base

log = logging.getLogger(__name__)

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Za-z0-9]")
SIGXFSZ = int(signal.SIGXFSZ)
SIGKILL = int(signal.SIGKILL)
PROGRAM_RUN_KERNELS = ("runflare-",)


@dataclass(frozen=True)
class KernelLanguage:
    """A kernel-run language id: which kernelspec runs it and under what name."""

    id: int
    label: str
    kernelspec: str
    source_file: str


BUILTIN_LANGUAGES = (
    KernelLanguage(1071, "Python 3", "python3", "script.py"),
    KernelLanguage(1063, "JavaScript", "deno", "script.js"),
    KernelLanguage(1074, "TypeScript", "deno", "script.ts"),
    KernelLanguage(1046, "Bash", "bash", "script.sh"),
)


def strip_ansi(text: str) -> str:
    """Remove terminal colour/control sequences."""
    return ANSI.sub("", text)


def probe_version(spec: KernelSpecInfo, label: str) -> str:
    """A Judge0-style name with real versions, e.g. "Python 3 (IPython kernel 7.4.0, Python 3.11.7)"."""
    return spec.adapter.version_name(label, spec.display_name)


def install_kernelspecs(user: bool = False, prefix: str | None = None) -> list[str]:
    """Install the bash_kernel and Deno kernelspecs when their packages are present; returns names installed.

    By default they go under this interpreter's prefix (``sys.prefix``: a virtual environment's own
    ``share/jupyter/kernels``), as ``ipykernel install --sys-prefix`` does; ``user`` installs into the
    user's Jupyter data directory, ``prefix`` under another prefix.
    """
    if user and prefix:
        raise ValueError("user and prefix are exclusive")
    target = None if user else (prefix or sys.prefix)
    installed: list[str] = []
    try:
        import bash_kernel  # noqa: F401
    except ImportError:
        pass
    else:
        args = [sys.executable, "-m", "bash_kernel.install"] + (["--user"] if user else ["--prefix", target])
        if subprocess.run(args, capture_output=True, timeout=120).returncode == 0:
            installed.append("bash")
    deno = None
    try:
        from deno import find_deno_bin

        deno = find_deno_bin()
    except Exception:
        deno = shutil.which("deno")
    if deno:
        env = {**os.environ}
        if target:  # next to this interpreter's (or the prefix's) other kernelspecs
            # `deno jupyter --install` writes to $XDG_DATA_HOME/jupyter (it ignores JUPYTER_DATA_DIR)
            env["XDG_DATA_HOME"] = os.path.join(target, "share")
            env["JUPYTER_DATA_DIR"] = os.path.join(target, "share", "jupyter")
        if subprocess.run([deno, "jupyter", "--install", "--force"], capture_output=True, env=env,
                          timeout=120).returncode == 0:
            installed.append("deno")
    return installed


async def _emit(emit: Emit, event: Event) -> None:
    r = emit(event)
    if inspect.isawaitable(r):
        await r


class StdinFeeder:
    """Answers a kernel's input_request lines from request.stdin or the interactive queue."""

    def __init__(self, request: RunRequest) -> None:
        self.buffer = "" if request.stdin_queue is not None else (request.stdin or "")
        self.queue = request.stdin_queue
        self.eof = request.stdin_queue is None

    async def line(self) -> str | None:
        """The next line without its newline; None at end of input."""
        while "\n" not in self.buffer and not self.eof and self.queue is not None:
            chunk = await self.queue.get()
            if chunk is None:
                self.eof = True
            else:
                self.buffer += chunk
        if not self.buffer:
            return None
        line, sep, rest = self.buffer.partition("\n")
        self.buffer = rest
        return line


class _Run:
    """One execution on one kernel, with limits watched; produces a RunResult."""

    TICK = 0.05  # how often limits and liveness are checked while messages flow

    def __init__(self, kernel: SandboxedKernel, request: RunRequest, emit: Emit, cgroup: Any) -> None:
        self.kernel = kernel
        self.request = request
        self.limits = request.limits
        self.emit = emit
        self.cgroup = cgroup
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.out_bytes = 0
        self.outputs: list[dict[str, Any]] = []
        self.exit_code: int | None = None
        self.exit_signal: int | None = None
        self.message: str | None = None
        self.outcome = "exited"
        self.msg_id: str | None = None
        self.reply: dict[str, Any] | None = None
        self.idle = False
        self.peak_rss_kb = 0
        self.base_rss_kb = 0
        self.stdin_task: asyncio.Task | None = None
        self.killed = False
        self.preamble_id: str | None = None
        self.base_cpu = 0.0
        self.cpu = 0.0
        self.wall = 0.0

    def cpu_seconds(self) -> float:
        if self.cgroup is not None:
            v = self.cgroup.cpu_seconds()
            if v is not None:
                return max(0.0, v - self.base_cpu)
        return max(0.0, sb.tree_cpu_seconds(self.kernel.processes()) - self.base_cpu)

    async def _stream(self, name: str, text: str) -> None:
        if name == "stderr" and self.request.redirect_stderr_to_stdout:
            name = "stdout"
        room = self.limits.max_output_bytes - self.out_bytes
        data = text.encode("utf-8", "surrogateescape")
        if len(data) > room:
            text = data[: max(room, 0)].decode("utf-8", "ignore")
            self.out_bytes = self.limits.max_output_bytes + 1
        else:
            self.out_bytes += len(data)
        if text:
            (self.stdout if name == "stdout" else self.stderr).append(text)
            await _emit(self.emit, {"kind": "stream", "stream": name, "text": text})
        if self.out_bytes > self.limits.max_output_bytes:
            self._stop("exited", signal_=SIGXFSZ,
                       message=f"output truncated: more than {self.limits.max_output_bytes} bytes of output")

    def _stop(self, outcome: str, signal_: int | None = None, message: str | None = None) -> None:
        if self.killed:
            return
        self.outcome = outcome
        self.exit_signal = signal_
        self.exit_code = None
        self.message = message
        self.idle = True
        self.killed = True

    async def _on_iopub(self, msg: dict[str, Any]) -> None:
        if msg.get("parent_header", {}).get("msg_id") != self.msg_id:
            return
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            await self._stream(content.get("name", "stdout"), content.get("text", ""))
        elif kind in ("display_data", "execute_result", "update_display_data"):
            out = {"data": content.get("data", {}), "metadata": content.get("metadata", {})}
            self.out_bytes += len(json.dumps(out))  # rich outputs count toward the output cap too
            if self.out_bytes > self.limits.max_output_bytes:
                self._stop("exited", signal_=SIGXFSZ, message="output truncated: more than "
                           f"{self.limits.max_output_bytes} bytes of output (rich outputs included)")
                return
            self.outputs.append(out)
            await _emit(self.emit, {"kind": "display", **out})
        elif kind == "error" and content.get("ename") != SETUP_ERROR:  # (that one is the shell reply's)
            await self._on_error(content)
        elif kind == "status" and content.get("execution_state") == "idle":
            self.idle = True

    async def _on_error(self, content: dict[str, Any]) -> None:
        ename, evalue = content.get("ename", ""), str(content.get("evalue", ""))
        if ename == "SystemExit":
            v = evalue.strip()
            if v in ("", "None"):
                self.exit_code = 0
            elif re.fullmatch(r"-?\d+", v):
                self.exit_code = int(v) & 0xFF
            else:
                self.exit_code = 1
                await self._stream("stderr", v + "\n")
            return
        status = self.kernel.spec.adapter.exit_status(content)
        if status is not None:  # bash_kernel: the command's exit status
            self.exit_code = status
            return
        self.exit_code = 1
        tb = strip_ansi("\n".join(content.get("traceback") or [f"{ename}: {evalue}"]))
        await self._stream("stderr", tb if tb.endswith("\n") else tb + "\n")

    async def _answer_stdin(self, feeder: StdinFeeder, msg: dict[str, Any]) -> None:
        prompt = msg["content"].get("prompt", "")
        if prompt:
            await self._stream("stdout", prompt)
        line = await feeder.line()
        self.kernel.client.input("\x04" if line is None else line)

    async def execute(self, code: str, preamble: str | None = None, setup: dict[str, Any] | None = None) -> None:
        """Send the (silent) preamble and the code (with the set-up the kernel does itself in its metadata),
        then pump messages until idle+reply, a limit, or the kernel's death. The kernel runs shell requests
        in order: no round trip in between."""
        kc = self.kernel.client
        feeder = StdinFeeder(self.request)
        base_cpu = self.cgroup.cpu_seconds() if self.cgroup is not None else None
        if base_cpu is None:  # no group's figure: its processes' CPU, and memory (watched on them then)
            procs = self.kernel.processes()
            base_cpu = sb.tree_cpu_seconds(procs)
            self.base_rss_kb = sb.tree_rss_kb(procs)
        self.base_cpu = base_cpu
        lim = self.limits
        cpu_kill = lim.cpu_time_limit + lim.cpu_extra_time
        t0 = self.t0 = time.monotonic()
        if preamble:
            self.preamble_id = kc.execute(preamble, silent=True, store_history=False)
        self.msg_id = kc.execute_with(code, {"runflare_setup": setup} if setup is not None else {},
                                      allow_stdin=True, stop_on_error=True)
        inbox: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        readers = [asyncio.ensure_future(self._read(kc, name, inbox)) for name in ("iopub", "shell", "stdin")]
        last_sample = 0.0
        died_at: float | None = None
        try:
            while not (self.idle and self.reply is not None) and not self.killed:
                try:
                    channel, msg = await asyncio.wait_for(inbox.get(), self.TICK)
                except asyncio.TimeoutError:
                    channel, msg = "", {}
                if channel == "iopub":
                    await self._on_iopub(msg)
                elif channel == "shell":
                    await self._on_shell(msg)
                elif channel == "stdin" and msg["msg_type"] == "input_request" and (
                        self.stdin_task is None or self.stdin_task.done()):
                    self.stdin_task = asyncio.ensure_future(self._answer_stdin(feeder, msg))
                now = time.monotonic()
                if self.killed or (channel and now - last_sample < self.TICK):
                    continue
                if now - t0 > lim.wall_time_limit:
                    self._stop("time_limit", message="wall time limit exceeded")
                    break
                last_sample = now
                refused = kc.refused()
                if refused:  # ZMQ dropped a message over the bound, undecoded; the channel stays cut
                    log.warning("kernel run %s: the kernel sent a %s message over %d bytes; run ended",
                                self.request.token, refused, kc.max_message_bytes)
                    self._stop("exited", signal_=SIGXFSZ,
                               message=f"kernel output message exceeded {kc.max_message_bytes} bytes")
                    break
                if self.cpu_seconds() > cpu_kill:
                    self._stop("time_limit", message="CPU time limit exceeded")
                    break
                if self.cgroup is None:
                    rss = sb.tree_rss_kb(self.kernel.processes())
                    self.peak_rss_kb = max(self.peak_rss_kb, rss)
                    if rss - self.base_rss_kb > lim.memory_limit:
                        self._stop("exited", signal_=SIGKILL, message="memory limit exceeded")
                        break
                if not self.kernel.alive():
                    died_at = died_at or now
                    if now - died_at > 0.3:  # let in-flight output arrive first
                        self._on_death()
                        break
        finally:
            for r in readers:
                r.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            while not inbox.empty():  # already read but not handled yet
                channel, msg = inbox.get_nowait()
                if channel == "iopub" and not self.killed:
                    await self._on_iopub(msg)
        self.wall = time.monotonic() - t0
        if not self.killed and self.kernel.spec.adapter.drains_after_idle:
            await self._drain()  # e.g. Deno publishes console output after its idle status
        self.cpu = self.cpu_seconds()
        if self.stdin_task is not None:
            self.stdin_task.cancel()
        if not self.killed and self.outcome == "exited" and self.exit_signal is None \
                and self.cpu > lim.cpu_time_limit:
            self.outcome, self.message = "time_limit", "CPU time limit exceeded"

    @staticmethod
    async def _read(kc: Any, name: str, inbox: asyncio.Queue) -> None:
        while True:
            inbox.put_nowait((name, await kc.next_msg(name)))

    async def _drain(self, quiet: float = 0.1, longest: float = 0.5) -> None:
        """Handle output that arrives after the kernel reported idle, until it goes quiet (at most `longest`
        seconds, and never past the wall limit: a timer that keeps printing must not hold the run)."""
        deadline = min(time.monotonic() + longest, self.t0 + self.limits.wall_time_limit)
        while not self.killed and time.monotonic() < deadline:
            try:
                msg = await self.kernel.client.next_msg("iopub", quiet)
            except TimeoutError:
                return
            await self._on_iopub(msg)

    def _on_death(self) -> None:
        code, sig = self.kernel.exit_status()
        if self.cgroup is not None and self.cgroup.oom_killed():
            self._stop("exited", signal_=SIGKILL, message="memory limit exceeded")
            return
        if sig:
            self._stop("exited", signal_=sig, message=f"kernel died (signal {sig})")
        else:  # the kernel process exited (os._exit(n), Deno.exit(n)): that is the program's status
            self._stop("exited")
            self.exit_code = code or 0

    async def _on_shell(self, msg: dict[str, Any]) -> None:
        parent = msg.get("parent_header", {}).get("msg_id")
        content = msg["content"]
        if (parent == self.preamble_id and content.get("status") != "ok") or (
                parent == self.msg_id and content.get("ename") == SETUP_ERROR):
            self._stop("internal", message=incident(
                log, "kernel set-up failed", detail=(self.request.token, content.get("ename"),
                                                     content.get("evalue"))))
        if parent != self.msg_id or msg["msg_type"] != "execute_reply":
            return
        self.reply = msg["content"]
        if self.exit_code is None:
            status = self.reply.get("status")
            self.exit_code = 0 if status == "ok" else 1

    def result(self) -> RunResult:
        if self.outcome == "time_limit":
            self.exit_code = None
        memory = None
        if self.cgroup is not None:
            memory = self.cgroup.peak_memory_kb()
        if memory is None and self.peak_rss_kb:
            memory = max(0, self.peak_rss_kb - self.base_rss_kb)
        return RunResult(outcome=self.outcome, stdout="".join(self.stdout), stderr="".join(self.stderr),
                         exit_code=self.exit_code, exit_signal=self.exit_signal,
                         time=round(self.cpu, 3), wall_time=round(self.wall, 3), memory=memory,
                         message=self.message, outputs=self.outputs)


def _tasks(group: Any, procs: list[psutil.Process]) -> int:
    """Processes and threads in the group now (what its pids limit counts)."""
    d = group.dirs.get("") or group.dirs.get("pids")
    try:
        return int((d / "pids.current").read_text())
    except (OSError, ValueError, TypeError):
        n = 0
        for p in procs:
            with contextlib.suppress(Exception):
                n += p.num_threads()
        return n


def _reset_peak(group: Any) -> None:
    """Start the group's peak memory from what it holds now (cgroup v1; v2's memory.peak is the group's
    whole life, which is the idle kernel's few pages more)."""
    if group.kind == "cgroup-v1":
        with contextlib.suppress(OSError):
            (group.dirs["memory"] / "memory.max_usage_in_bytes").write_text("0")


class KernelRuns:
    """The kernel-run engine: language table, warm pools, sandboxed execution."""

    def __init__(self, pool_sizes: dict[str, int] | None = None, sandbox: str = "auto",
                 extra_ids: dict[int, str] | None = None, runtime_dir: str | Path | None = None,
                 start_timeout: float = 30.0, max_parallel_starts: int | None = None, fork_server: bool = True,
                 max_output_bytes: int | None = None, pool_max: int | None = None,
                 pool_window: float = 10.0) -> None:
        if max_output_bytes:  # kernel messages are bounded from it (see bounded_client)
            bounded_client.allow_output(max_output_bytes)
        self.pool_sizes = {"python3": 2} if pool_sizes is None else dict(pool_sizes)
        cpus = os.cpu_count() or 1
        # a pool grows with its arrival rate up to pool_max ready kernels (None: 4 per core; 0: no growth),
        # and shrinks back to its pool_sizes entry (0 for a kernelspec not listed) once a window passes quieter
        self.pool_max = 4 * cpus if pool_max is None else pool_max
        self.pool_window = pool_window
        self.requested_sandbox = sandbox
        self.extra_ids = dict(extra_ids or {})
        # ipc socket paths must fit in sun_path (107 bytes): "<runtime>/k-<12 hex>/k-1"
        if runtime_dir is not None and len(os.fsencode(os.path.abspath(runtime_dir))) > 80:
            log.info("runtime dir %s too long for ipc socket paths; using a short temp dir", runtime_dir)
            runtime_dir = None
        self._own_runtime = runtime_dir is None
        # what kernels write there is charged to them; named for scratch.sweep_stale() if we get killed
        self.runtime_dir = Path(runtime_dir) if runtime_dir else scratch.private_dir("kernels", scratch_base())
        self.start_timeout = start_timeout
        self.use_fork_server = fork_server
        self.fork_server: ForkServer | None = None
        # a start waits too (the fork server's pipe, the kernel's replies): one more than the cores keeps them busy
        self.max_parallel_starts = max_parallel_starts or cpus + 1
        self.mode = "unavailable"
        self.cgroups = "rlimits"
        self.pools: dict[str, KernelPool] = {}
        self._specs: dict[str, KernelSpecInfo] = {}
        self._languages: dict[int, LanguageInfo] = {}
        self._active: set[SandboxedKernel] = set()
        self._ending: set[asyncio.Task] = set()  # shutdowns of used kernels, after their results (stop waits)
        self._starts: asyncio.Semaphore | None = None
        self.runs = 0

    async def start(self) -> None:
        """Detect the sandbox, kernelspecs and versions; start the warm pools (filled in the background)."""
        loop = asyncio.get_running_loop()
        self.mode = await loop.run_in_executor(None, sb.detect_mode, self.requested_sandbox)
        self.cgroups = await loop.run_in_executor(None, sb.cgroup_mechanism)
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        self._starts = asyncio.Semaphore(self.max_parallel_starts)
        if self.mode == "unavailable":
            log.error("kernel runs disabled: neither bwrap nor unshare works here (choose --sandbox none "
                      "explicitly to run unsandboxed)")
            return
        for name in installed_kernelspecs():
            if name.startswith(PROGRAM_RUN_KERNELS):
                continue  # the project's own program-run kernels sandbox each program themselves
            try:
                self._specs[name] = load_spec(name)
            except Exception as e:  # a broken kernelspec is simply not offered
                log.warning("kernelspec %s unusable: %s", name, e)
        table = [*BUILTIN_LANGUAGES, *(KernelLanguage(i, s, s, "script") for i, s in self.extra_ids.items())]
        probes = [(lang, loop.run_in_executor(None, probe_version, self._specs[lang.kernelspec], lang.label))
                  for lang in table if lang.kernelspec in self._specs]
        for lang, fut in probes:
            name = await fut
            self._languages[lang.id] = LanguageInfo(id=lang.id, name=name, source_file=lang.source_file,
                                                    kernel=lang.kernelspec)
        if self.use_fork_server and self.mode == "bwrap" and os.geteuid() == 0:
            self.fork_server = ForkServer(self.runtime_dir)  # forks ipykernels (~4x less start CPU)
        for name, size in self.pool_sizes.items():
            if name in self._specs and size > 0:
                await self._pool(name).start()

    def _pool(self, name: str) -> KernelPool:
        if name not in self.pools:
            size = self.pool_sizes.get(name, 0)
            self.pools[name] = KernelPool(self._specs[name], size, self.mode, self.runtime_dir, self.start_timeout,
                                          self._starts, fork_server=self.fork_server,
                                          max_size=self.pool_max, window=self.pool_window)
        return self.pools[name]

    async def wait_ready(self, timeout: float = 60.0) -> bool:
        """Wait until every warm pool is full (tests, benchmarks)."""
        results = await asyncio.gather(*(p.wait_full(timeout) for p in self.pools.values()))
        return all(results)

    async def stop(self) -> None:
        """Stop the pools and kill every kernel, idle or running."""
        await asyncio.gather(*(p.stop() for p in self.pools.values()), return_exceptions=True)
        await asyncio.gather(*(k.shutdown() for k in list(self._active)), return_exceptions=True)
        while self._ending:
            await asyncio.gather(*list(self._ending), return_exceptions=True)
        if self.fork_server is not None:
            self.fork_server.close()
        if self._own_runtime:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def languages(self) -> list[LanguageInfo]:
        """Kernel-run languages whose kernelspec is installed."""
        return sorted(self._languages.values(), key=lambda lang: lang.id)

    def kernelspecs(self) -> list[str]:
        """Kernelspec names usable in a submission's ``kernel`` field."""
        return sorted(self._specs)

    def health(self) -> dict[str, Any]:
        """Sandbox mechanism, cgroup mechanism and each pool's state."""
        return {"sandbox": self.mode, "cgroups": self.cgroups,
                "fork_server": None if self.fork_server is None else {"forks": self.fork_server.forks}, "running": len(self._active), "runs": self.runs,
                "pools": {name: p.health() for name, p in self.pools.items()}}

    def _kernelspec_for(self, request: RunRequest) -> str | None:
        if request.kernel:
            return request.kernel if request.kernel in self._specs else None
        lang = self._languages.get(request.language_id or -1)
        return lang.kernel if lang else None

    async def run(self, request: RunRequest, emit: Emit) -> RunResult:
        """Run one submission in a fresh sandboxed kernel. Never raises for user-code failures."""
        name = self._kernelspec_for(request)
        if name is None or self.mode == "unavailable":
            what = request.kernel or request.language_id
            return RunResult(outcome="internal", message=f"no kernel available for {what!r}")
        self.runs += 1
        await _emit(emit, {"kind": "stage", "stage": "starting", "message": f"waiting for a {name} kernel"})
        try:
            kernel = await self._pool(name).acquire(network=request.limits.enable_network)
        except Exception as e:  # the reason (a log tail, host paths) goes to the log only
            return RunResult(outcome="internal", message=incident(
                log, f"the {name} kernel could not start", exc=e, detail=request.token))
        self._active.add(kernel)
        cgroup = None
        try:
            cgroup = self._confine(kernel, request)
            lang = self._languages.get(request.language_id or -1)
            source_file = lang.source_file if lang and lang.source_file else "script"
            adapter = kernel.spec.adapter
            await _emit(emit, {"kind": "stage", "stage": "running", "message": "running"})
            run = _Run(kernel, request, emit, cgroup)
            await run.execute(adapter.code(request), adapter.preamble(request, source_file),
                              adapter.setup(request, source_file))
            return run.result()
        except Exception as e:
            return RunResult(outcome="internal", message=incident(log, "the kernel run failed", exc=e,
                                                                  detail=request.token))
        finally:
            self._active.discard(kernel)
            self._end(kernel, cgroup)

    def _end(self, kernel: SandboxedKernel, cgroup: Any) -> None:
        """SIGKILL the used kernel now; wait for it and clean up after the result is returned."""
        kernel.kill_now()
        if cgroup is not None and cgroup is not kernel.cgroup:
            with contextlib.suppress(OSError):
                for pid in cgroup.pids():
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)

        async def end() -> None:
            await kernel.shutdown()
            if cgroup is not None:
                await asyncio.get_running_loop().run_in_executor(None, cgroup.remove)

        task = asyncio.get_running_loop().create_task(end())
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    def _confine(self, kernel: SandboxedKernel, request: RunRequest) -> Any:
        """Set this run's limits on the kernel's cgroup (made while it waited in the pool; else a fresh one,
        the tree moved into it) and its RLIMIT_FSIZE."""
        lim = request.limits
        procs = kernel.members()
        sb.set_rlimits(procs, lim)
        group = kernel.cgroup
        if group is not None:
            try:
                group.set_limits(lim.memory_limit, _tasks(group, procs) + lim.max_processes_and_or_threads)
                _reset_peak(group)
                return group
            except OSError as e:  # e.g. a v1 limit below what the idle kernel already holds: a fresh group
                log.info("kernel %s: its pool cgroup refused the run's limits (%s); a fresh group", kernel.id, e)
        tasks = 0
        for p in procs:
            with contextlib.suppress(Exception):
                tasks += p.num_threads()
        cgroup = sb.create_cgroup(f"run-{os.getpid()}-k{kernel.id}", lim.memory_limit, tasks + lim.max_processes_and_or_threads)
        if cgroup is None:
            if self.cgroups.startswith("cgroup"):  # cgroups are in use here: no run without its limits
                raise RuntimeError(f"kernel {kernel.id}: no cgroup could be made for the run's limits")
            return None  # rlimits only, as on a host without a writable hierarchy
        try:
            for p in procs:
                cgroup.add_pid(p.pid)
        except OSError as e:
            cgroup.remove()
            raise RuntimeError(f"kernel {kernel.id}: could not move it into its run's cgroup") from e
        return cgroup
