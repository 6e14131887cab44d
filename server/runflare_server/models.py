"""Pydantic models of the API: submission validation with Judge0's rules and error shape, and output rendering."""

from __future__ import annotations

import base64
import binascii
import functools
import math
import re
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import Settings
from .outbound import literal_refusal, parse_networks, url_problem
from .statuses import STATUSES
from .submission import Submission

FieldErrors = dict[str, list[str]]


class SubmissionCreate(BaseModel):
    """The body of POST /submissions. Unknown keys are ignored, as Judge0 does."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    source_code: str | None = Field(None, description="The program (base64 when base64_encoded=true)")
    language_id: int | None = Field(None, description="An id from /languages")
    stdin: str | None = None
    expected_output: str | None = None
    cpu_time_limit: float | None = Field(None, description="Seconds of CPU")
    cpu_extra_time: float | None = None
    wall_time_limit: float | None = None
    memory_limit: int | None = Field(None, description="KB")
    stack_limit: int | None = Field(None, description="KB")
    max_processes_and_or_threads: int | None = None
    enable_per_process_and_thread_time_limit: bool | None = None
    enable_per_process_and_thread_memory_limit: bool | None = None
    max_file_size: int | None = Field(None, description="KB")
    compiler_options: str | None = None
    command_line_arguments: str | None = None
    redirect_stderr_to_stdout: bool | None = None
    callback_url: str | None = None
    additional_files: str | None = None
    enable_network: bool | None = None
    number_of_runs: int | None = None
    kernel: str | None = Field(None, description="(RF) an installed kernelspec: a kernel run on it")
    interactive: bool | None = Field(None, description="(RF) stdin comes from the WebSocket")


class LanguageRef(BaseModel):
    """`language` in a submission: Judge0's {id, name} (id null for a kernel run named by `kernel` alone)."""

    model_config = ConfigDict(extra="forbid")

    id: int | None
    name: str


class StatusModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: int
    description: str


class SubmissionView(BaseModel):
    """A submission as GET returns it. `fields` picks which keys come, so none is required; `fields=*` gives
    exactly Judge0's 35 (JUDGE0_FIELDS), the (RF) ones come only when named. A type without `| None` is
    never null."""

    model_config = ConfigDict(extra="forbid")

    source_code: str = Field(None, description="The program (base64 when base64_encoded=true)")
    language_id: int | None = Field(None, description="null for a kernel run named by `kernel` alone")
    stdin: str | None = None
    expected_output: str | None = None
    stdout: str | None = None
    status_id: int = None  # type: ignore[assignment]
    created_at: str = Field(None, description="ISO 8601, UTC, milliseconds: 2026-11-25T10:00:00.123Z")
    finished_at: str | None = None
    time: str | None = Field(None, description='CPU seconds, "0.012"; null until finished')
    memory: int | None = Field(None, description="KB; null until finished")
    stderr: str | None = None
    token: str = None  # type: ignore[assignment]
    number_of_runs: int = None  # type: ignore[assignment]
    cpu_time_limit: str = Field(None, description='seconds, a decimal string: "5.0"')
    cpu_extra_time: str = Field(None, description='seconds, a decimal string: "1.0"')
    wall_time_limit: str = Field(None, description='seconds, a decimal string: "10.0"')
    memory_limit: int = Field(None, description="KB")
    stack_limit: int = Field(None, description="KB")
    max_processes_and_or_threads: int = None  # type: ignore[assignment]
    enable_per_process_and_thread_time_limit: bool = None  # type: ignore[assignment]
    enable_per_process_and_thread_memory_limit: bool = None  # type: ignore[assignment]
    max_file_size: int = Field(None, description="KB")
    compile_output: str | None = None
    exit_code: int | None = None
    exit_signal: int | None = None
    message: str | None = None
    wall_time: str | None = Field(None, description='wall seconds, "0.031"; null until finished')
    compiler_options: str | None = None
    command_line_arguments: str | None = None
    redirect_stderr_to_stdout: bool = None  # type: ignore[assignment]
    callback_url: str | None = None
    additional_files: str | None = None
    enable_network: bool = None  # type: ignore[assignment]
    status: StatusModel = Field(None, description='{"id": 3, "description": "Accepted"}')
    language: LanguageRef | None = Field(None, description='{"id": 71, "name": "Python (3.11.7)"}')
    # (RF) fields: only when named in `fields`.
    kernel: str | None = Field(None, description="(RF) the kernelspec of a kernel run named by `kernel`")
    interactive: bool = Field(None, description="(RF) stdin comes from the WebSocket")
    outputs: list[dict[str, Any]] = Field(None, description="(RF) rich displays [{data: {mime: value}, metadata}]")
    session: dict[str, Any] = Field(None, description="(RF) how it ran: {kind: program|kernel, ...}")


class NotUtf8View(BaseModel):
    """What GET gives instead of a submission whose text is not UTF-8 when base64_encoded is not true."""

    model_config = ConfigDict(extra="forbid")

    token: str
    error: str


class BatchCreate(BaseModel):
    submissions: list[dict[str, Any]]


class Language(BaseModel):
    id: int
    name: str
    is_archived: bool | None = None
    source_file: str | None = None
    compile_cmd: str | None = None
    run_cmd: str | None = None
    kernel: str | None = None


class ErrorBody(BaseModel):
    error: str


# Judge0's `fields=*`: exactly these 35 keys (judge0-reference.md), in Judge0's order.
JUDGE0_FIELDS = [
    "source_code", "language_id", "stdin", "expected_output", "stdout", "status_id", "created_at", "finished_at",
    "time", "memory", "stderr", "token", "number_of_runs", "cpu_time_limit", "cpu_extra_time", "wall_time_limit",
    "memory_limit", "stack_limit", "max_processes_and_or_threads", "enable_per_process_and_thread_time_limit",
    "enable_per_process_and_thread_memory_limit", "max_file_size", "compile_output", "exit_code", "exit_signal",
    "message", "wall_time", "compiler_options", "command_line_arguments", "redirect_stderr_to_stdout",
    "callback_url", "additional_files", "enable_network", "status", "language",
]
RF_FIELDS = ["kernel", "interactive", "outputs", "session"]  # (RF): only when named
ALL_FIELDS = JUDGE0_FIELDS + RF_FIELDS
assert set(SubmissionView.model_fields) == set(ALL_FIELDS), "SubmissionView and ALL_FIELDS disagree"
DEFAULT_FIELDS = ["token", "time", "memory", "stdout", "stderr", "compile_output", "message", "status"]
TEXT_FIELDS = ("source_code", "stdin", "expected_output")
ENCODED_OUT = ("source_code", "stdin", "expected_output", "stdout", "stderr", "compile_output", "message")
DECIMAL_FIELDS = ("cpu_time_limit", "cpu_extra_time", "wall_time_limit")
LIMIT_FIELDS = (
    "cpu_time_limit", "cpu_extra_time", "wall_time_limit", "memory_limit", "stack_limit",
    "max_processes_and_or_threads", "max_file_size", "number_of_runs",
)
# (field, min, max-setting) for the range checks
RANGES: dict[str, tuple[float, str]] = {
    "cpu_time_limit": (0, "max_cpu_time_limit"),
    "cpu_extra_time": (0, "max_cpu_extra_time"),
    "wall_time_limit": (1, "max_wall_time_limit"),
    "memory_limit": (2048, "max_memory_limit"),
    "stack_limit": (0, "max_stack_limit"),
    "max_processes_and_or_threads": (1, "max_max_processes_and_or_threads"),
    "max_file_size": (0, "max_max_file_size"),
    "number_of_runs": (1, "max_number_of_runs"),
}
PYDANTIC_MESSAGES = {
    "int_parsing": "is not a number", "int_type": "is not a number", "int_from_float": "must be an integer",
    "float_parsing": "is not a number", "float_type": "is not a number",
    "bool_parsing": "is not a boolean", "bool_type": "is not a boolean",
    "string_type": "must be a string", "finite_number": "is not a number",
}


class SubmissionRules:
    """Validates bodies against this server's settings, languages and kernelspecs."""

    def __init__(self, settings: Settings, language_ids: set[int], kernelspecs: set[str]):
        self.settings = settings
        self.language_ids = language_ids
        self.kernelspecs = kernelspecs

    def validate(self, body: Any, base64_encoded: bool) -> tuple[dict[str, Any] | None, FieldErrors]:
        """Return (submission fields with defaults applied, {}) or (None, Judge0-shaped field errors)."""
        if not isinstance(body, dict):
            return None, {"base": ["submission must be a JSON object"]}
        try:
            parsed = SubmissionCreate.model_validate(body)
        except ValidationError as exc:
            errors: FieldErrors = {}
            for err in exc.errors():
                name = str(err["loc"][0]) if err["loc"] else "base"
                errors.setdefault(name, []).append(PYDANTIC_MESSAGES.get(err["type"], err["msg"]))
            return None, errors
        data = parsed.model_dump()
        errors = {}
        add = lambda field, msg: errors.setdefault(field, []).append(msg)  # noqa: E731
        s = self.settings

        for name in TEXT_FIELDS:
            if data[name] is None:
                continue
            if base64_encoded:
                try:
                    packed = "".join(data[name].split())  # Judge0's encoder wraps lines at 60 characters
                    raw = base64.b64decode(packed.encode("ascii"), validate=True)
                    data[name] = raw.decode("utf-8", errors="surrogateescape")
                except (binascii.Error, ValueError, UnicodeEncodeError):
                    add(name, "is not valid base64")
            else:
                try:
                    data[name].encode("utf-8")
                except UnicodeEncodeError:
                    add(name, "is not valid UTF-8")
        if not data["source_code"] and "source_code" not in errors:
            add("source_code", "can't be blank")
        elif "source_code" not in errors and len(to_bytes(data["source_code"])) > s.max_source_size:
            add("source_code", f"is too long (maximum is {s.max_source_size} bytes)")
        if data["stdin"] and "stdin" not in errors and len(to_bytes(data["stdin"])) > s.max_stdin_size:
            add("stdin", f"is too long (maximum is {s.max_stdin_size} bytes)")

        if data["kernel"] is not None and data["kernel"] not in self.kernelspecs:
            add("kernel", f"kernel {data['kernel']!r} is not installed")
        if data["language_id"] is None:
            if data["kernel"] is None:
                add("language_id", "can't be blank")
        elif data["language_id"] not in self.language_ids:
            add("language_id", f"language with id {data['language_id']} doesn't exist")

        for name, (low, high_key) in RANGES.items():
            if data[name] is None:
                data[name] = getattr(s, name)
                continue
            high = getattr(s, high_key)
            if data[name] < low:
                add(name, f"must be greater than or equal to {low}")
            elif data[name] > high:
                add(name, f"must be less than or equal to {high:g}")

        for name in ("compiler_options", "command_line_arguments"):
            if data[name] is not None and len(data[name]) > 512:
                add(name, "is too long (maximum is 512 characters)")
        if data["compiler_options"] and not s.enable_compiler_options:
            add("compiler_options", "setting compiler options is not allowed")
        elif (data["compiler_options"] and s.allowed_languages_for_compile_options
              and data["language_id"] not in s.allowed_languages_for_compile_options):
            add("compiler_options", "setting compiler options is not allowed for this language")
        if data["command_line_arguments"] and not s.enable_command_line_arguments:
            add("command_line_arguments", "setting command line arguments is not allowed")
        if data["callback_url"] is not None:
            problem = url_problem(data["callback_url"])  # scheme, user info, control characters
            refused = problem is None and literal_refusal(data["callback_url"],
                                                          parse_networks(s.callback_allowed_networks))
            if problem:
                add("callback_url", problem)
            elif refused:  # an IP literal; names are checked when the callback connects
                add("callback_url", f"must not point to {refused}")
            elif not s.enable_callbacks:
                add("callback_url", "callbacks are not allowed")
        if data["additional_files"] is not None and not s.enable_additional_files:
            add("additional_files", "additional files are not supported by this server")

        if data["enable_network"] is None:
            data["enable_network"] = s.enable_network
        elif data["enable_network"] and not s.allow_enable_network:
            add("enable_network", "enabling network is not allowed")
        for flag in ("enable_per_process_and_thread_time_limit", "enable_per_process_and_thread_memory_limit"):
            if data[flag] is None:
                data[flag] = getattr(s, flag)
            elif data[flag] and not getattr(s, "allow_" + flag):
                add(flag, "is not allowed")
        if data["redirect_stderr_to_stdout"] is None:
            data["redirect_stderr_to_stdout"] = s.redirect_stderr_to_stdout
        data["interactive"] = bool(data["interactive"])
        return (None, errors) if errors else (data, {})


# What `fields` may be: names from ALL_FIELDS or `*`, separated by commas (spaces and empty items ignored).
# The server checks it with this pattern (re.search, as a JSON Schema validator does) and the OpenAPI
# description declares it, so both say the same.
FIELDS_PATTERN = "^[ ,]*(?:(?:\\*|" + "|".join(sorted(ALL_FIELDS, key=len, reverse=True)) + ") *(?:,[ ,]*|$))*$"


def parse_fields(raw: str | None) -> list[str]:
    """The `fields` query parameter; raises ValueError("invalid fields: [..]") for unknown names.

    `*` stands for Judge0's 35 keys; (RF) fields come only when named (`*,outputs,session`)."""
    raw = raw or ""
    if "\n" in raw or not re.search(FIELDS_PATTERN, raw):  # `$` ends the text (as in JSON Schema's ECMA regex)
        names = [name.strip(" ") for name in raw.split(",") if name.strip(" ")]
        unknown = [name for name in names if name != "*" and name not in ALL_FIELDS]
        raise ValueError(f"invalid fields: [{', '.join(unknown or names)}]")
    names = [name.strip(" ") for name in raw.split(",") if name.strip(" ")]
    if not names:
        return DEFAULT_FIELDS
    chosen: list[str] = []
    for name in names:
        for one in JUDGE0_FIELDS if name == "*" else [name]:
            if one not in chosen:
                chosen.append(one)
    return chosen


def iso(ts: float | None) -> str | None:
    """Seconds since the epoch → ISO 8601, UTC, milliseconds, Z (as datetime rounds to microseconds,
    then cut to milliseconds)."""
    if ts is None:
        return None
    frac, second = math.modf(ts)
    micro = round(frac * 1_000_000)
    if micro >= 1_000_000:
        second, micro = second + 1, micro - 1_000_000
    return f"{_iso_second(int(second))}.{micro // 1000:03d}Z"


@functools.lru_cache(maxsize=8)
def _iso_second(second: int) -> str:
    """One second's ISO 8601 text (every event of a second shares it; formatting it is the slow part)."""
    return datetime.fromtimestamp(second, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def seconds(value: float | None) -> str | None:
    return None if value is None else f"{value:.3f}"


def to_bytes(text: str) -> bytes:
    """Text as the bytes it stands for: undecodable bytes were kept as surrogateescape."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte
        return text.encode("utf-8", "replace")


class NotUtf8(ValueError):
    """Output holds bytes that are not UTF-8; the client must ask for base64."""


def render(sub: Submission, fields: list[str], base64_encoded: bool, language_names: dict[int, str]) -> dict:
    """A stored submission → the JSON object clients see, with only `fields`."""
    out: dict[str, Any] = {}
    for name in fields:
        value = sub.get(name)
        if name == "status":
            value = STATUSES[sub["status_id"]].rest()
        elif name == "language":
            lid = sub.get("language_id")
            value = {"id": lid, "name": language_names.get(lid, sub.get("kernel") or "")} if lid or sub.get("kernel") else None
        elif name in ("created_at", "finished_at"):
            value = iso(value)
        elif name in ("time", "wall_time"):
            value = seconds(value)
        elif name in DECIMAL_FIELDS:
            value = None if value is None else str(float(value))
        elif name in ENCODED_OUT and value is not None:
            raw = to_bytes(value)
            if base64_encoded:
                value = base64.b64encode(raw).decode("ascii")
            else:
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise NotUtf8(name) from exc
        out[name] = value
    return out
