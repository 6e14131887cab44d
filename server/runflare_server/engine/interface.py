"""The engine's contract: what a run takes, what it emits while running, what it returns.

The engine knows nothing of HTTP, the store or the broker. The worker builds a ``RunRequest``
from a stored submission, calls ``Engine.run(request, emit)`` and turns the ``RunResult`` into
the submission's final state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol


@dataclass(frozen=True)
class Limits:
    """Per-run limits, in Judge0's units (seconds, KB)."""

    cpu_time_limit: float = 5.0
    cpu_extra_time: float = 1.0
    wall_time_limit: float = 10.0
    memory_limit: int = 128_000
    stack_limit: int = 64_000
    max_processes_and_or_threads: int = 60
    max_file_size: int = 1024
    enable_network: bool = False
    enable_per_process_and_thread_time_limit: bool = False
    enable_per_process_and_thread_memory_limit: bool = False
    max_output_bytes: int = 1 << 20  # stdout + stderr kept per run; the rest is cut (message says so)


class StdinSource(Protocol):
    """An interactive run's stdin: an asyncio.Queue, or the broker's channel that crosses processes."""

    async def get(self) -> str | None: ...


@dataclass
class RunRequest:
    """One run of one submission."""

    token: str
    source_code: str
    language_id: int | None = None  # a program-run id (71, 50...) or a kernel-run id (1071...)
    kernel: str | None = None  # a kernelspec name: a kernel run on that kernel
    stdin: str | None = None
    compiler_options: str | None = None
    command_line_arguments: str | None = None
    redirect_stderr_to_stdout: bool = False
    limits: Limits = field(default_factory=Limits)
    compile_limits: Limits | None = None  # the compile step's (the server's maxima); None: the engine's default
    # Interactive runs: where the client's stdin arrives (str chunks, then None for end of input).
    stdin_queue: StdinSource | None = None


# Events the engine emits while a run goes on (the worker turns them into WebSocket messages):
#   {"kind": "stage", "stage": "starting" | "compiling" | "running", "message": str}
#   {"kind": "stream", "stream": "stdout" | "stderr", "text": str}
#   {"kind": "display", "data": {mime: value}, "metadata": {...}}
Event = dict[str, Any]
Emit = Callable[[Event], Awaitable[None] | None]

Outcome = Literal[
    "exited",  # the program ran and exited (exit_code says how), or was killed (exit_signal)
    "compile_error",  # compile step failed; compile_output holds why
    "time_limit",  # CPU or wall limit hit
    "exec_format",  # the program could not be executed at all
    "internal",  # the server failed; message says why
]


@dataclass
class RunResult:
    """What a finished run produced. Output is text; undecodable bytes are kept as surrogateescape."""

    outcome: Outcome
    stdout: str = ""
    stderr: str = ""
    compile_output: str | None = None
    exit_code: int | None = None
    exit_signal: int | None = None
    time: float | None = None  # CPU seconds of the program
    wall_time: float | None = None  # wall seconds of the program
    memory: int | None = None  # peak KB of the program
    message: str | None = None
    outputs: list[dict[str, Any]] = field(default_factory=list)  # rich displays {"data", "metadata"}


@dataclass(frozen=True)
class LanguageInfo:
    """A language as the API lists it."""

    id: int
    name: str  # with the detected version: "Python (3.11.7)"
    is_archived: bool = False
    source_file: str | None = None
    compile_cmd: str | None = None
    run_cmd: str | None = None
    kernel: str | None = None  # the kernelspec it runs on


class Engine(Protocol):
    """Runs submissions through managed Jupyter kernels."""

    async def start(self) -> None:
        """Detect languages, start warm pools."""

    async def stop(self) -> None:
        """Shut every kernel down; leave no process behind."""

    def languages(self) -> list[LanguageInfo]:
        """Languages available on this host (toolchain and kernel present)."""

    def kernelspecs(self) -> list[str]:
        """Kernelspec names usable in a submission's ``kernel`` field."""

    async def run(self, request: RunRequest, emit: Emit) -> RunResult:
        """Run one submission, emitting events as it goes. Never raises for user-code failures."""

    def health(self) -> dict[str, Any]:
        """Pools per language/kernelspec, sandbox mechanism in use."""
