"""Judge0 statuses and how a run's result maps to one."""

from __future__ import annotations

from dataclasses import dataclass

from .engine.interface import RunResult


@dataclass(frozen=True)
class Status:
    id: int
    name: str  # Judge0's description, the short label: "Accepted"
    sentence: str  # what the WebSocket calls description: "Submission completed successfully"

    def rest(self) -> dict:
        return {"id": self.id, "description": self.name}

    def ws(self) -> dict:
        return {"id": self.id, "name": self.name, "description": self.sentence}


STATUSES: dict[int, Status] = {
    s.id: s
    for s in [
        Status(1, "In Queue", "Submission is waiting in the queue"),
        Status(2, "Processing", "Submission is being compiled or run"),
        Status(3, "Accepted", "Submission completed successfully"),
        Status(4, "Wrong Answer", "Output differs from the expected output"),
        Status(5, "Time Limit Exceeded", "The program exceeded its time limit"),
        Status(6, "Compilation Error", "The program failed to compile"),
        Status(7, "Runtime Error (SIGSEGV)", "The program was killed by a segmentation fault"),
        Status(8, "Runtime Error (SIGXFSZ)", "The program wrote past its file size limit"),
        Status(9, "Runtime Error (SIGFPE)", "The program was killed by a floating point exception"),
        Status(10, "Runtime Error (SIGABRT)", "The program aborted"),
        Status(11, "Runtime Error (NZEC)", "The program exited with a non-zero exit code"),
        Status(12, "Runtime Error (Other)", "The program was killed by a signal"),
        Status(13, "Internal Error", "The server failed to run the submission"),
        Status(14, "Exec Format Error", "The program could not be executed"),
    ]
}

IN_QUEUE, PROCESSING, ACCEPTED, WRONG_ANSWER, TIME_LIMIT, COMPILATION_ERROR = 1, 2, 3, 4, 5, 6
NZEC, INTERNAL_ERROR, EXEC_FORMAT_ERROR = 11, 13, 14
SIGNAL_STATUS = {11: 7, 25: 8, 8: 9, 6: 10}


def is_final(status_id: int) -> bool:
    """Whether a submission with this status is over (anything past In Queue and Processing)."""
    return status_id not in (IN_QUEUE, PROCESSING)


def normalize_output(text: str | None) -> str:
    """Judge0's comparison form: trailing whitespace stripped on each line and at the end."""
    return "\n".join(line.rstrip() for line in (text or "").split("\n")).rstrip()


def status_of(result: RunResult, expected_output: str | None) -> int:
    """The Judge0 status id of a finished run."""
    if result.outcome == "internal":
        return INTERNAL_ERROR
    if result.outcome == "exec_format":
        return EXEC_FORMAT_ERROR
    if result.outcome == "compile_error":
        return COMPILATION_ERROR
    if result.outcome == "time_limit":
        return TIME_LIMIT
    if result.exit_signal:
        return SIGNAL_STATUS.get(result.exit_signal, 12)
    if result.exit_code:
        return NZEC
    if expected_output is not None and normalize_output(result.stdout) != normalize_output(expected_output):
        return WRONG_ANSWER
    return ACCEPTED
