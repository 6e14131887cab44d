"""The submission record: one typed model shared by the store, the worker, the API and the renderer."""

from __future__ import annotations

import time
import uuid
from typing import Any, TypedDict

from .statuses import IN_QUEUE


class Session(TypedDict):
    kind: str  # "program" or "kernel"


class Submission(TypedDict, total=False):
    """A submission as stored: what the client sent (validated, limits filled in), then its result.

    Every backend stores it as one JSON document keyed by ``token`` (with ``created_at`` and
    ``status_id`` also as columns, for ordering and recovery).
    """

    token: str
    status_id: int
    created_at: float  # epoch seconds
    finished_at: float | None
    # Request (see models.SubmissionCreate).
    source_code: str
    language_id: int | None
    kernel: str | None
    stdin: str | None
    expected_output: str | None
    cpu_time_limit: float
    cpu_extra_time: float
    wall_time_limit: float
    memory_limit: int
    stack_limit: int
    max_processes_and_or_threads: int
    enable_per_process_and_thread_time_limit: bool
    enable_per_process_and_thread_memory_limit: bool
    max_file_size: int
    compiler_options: str | None
    command_line_arguments: str | None
    redirect_stderr_to_stdout: bool
    callback_url: str | None
    additional_files: str | None
    enable_network: bool
    number_of_runs: int
    interactive: bool
    session: Session
    # Result.
    stdout: str | None
    stderr: str | None
    compile_output: str | None
    message: str | None
    exit_code: int | None
    exit_signal: int | None
    time: float | None
    wall_time: float | None
    memory: int | None
    outputs: list[dict[str, Any]]
    attempts: int  # how many times a worker took it (a run that kills its worker is retried)


RESULT_FIELDS = ("stdout", "stderr", "compile_output", "message", "exit_code", "exit_signal", "time",
                 "wall_time", "memory")


def new_submission(data: dict[str, Any]) -> Submission:
    """A new queued submission from validated request data."""
    is_kernel_run = bool(data.get("kernel")) or (data.get("language_id") or 0) >= 1000
    sub: dict[str, Any] = {
        **data,
        "token": str(uuid.uuid4()),
        "status_id": IN_QUEUE,
        "created_at": time.time(),
        "finished_at": None,
        **dict.fromkeys(RESULT_FIELDS),
        "outputs": [],
        "session": {"kind": "kernel" if is_kernel_run else "program"},
    }
    return sub  # type: ignore[return-value]
