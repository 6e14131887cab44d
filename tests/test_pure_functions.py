"""Unit tests of pure functions with security weight: the Judge0 status of a result, the rendering and
field selection of a submission, and the runner's reading of its reaper's status line (which a program may
try to forge)."""

from __future__ import annotations

import base64
import errno

import pytest

from runflare_server.engine.interface import RunResult
from runflare_server.kernels.runner import StepResult, _parse_status, _reaper_exited_as_it_said
from runflare_server.models import DEFAULT_FIELDS, JUDGE0_FIELDS, RF_FIELDS, NotUtf8, parse_fields, render
from runflare_server.statuses import STATUSES, normalize_output, status_of


def exited(code: int) -> int:
    """A wait status: exited with `code`."""
    return (code & 0xFF) << 8


def killed(sig: int) -> int:
    """A wait status: killed by `sig`."""
    return sig


# -- status_of --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("result, expected, status", [
    (RunResult("internal", stdout="ok", exit_code=0), "ok", 13),  # never Accepted, whatever it printed
    (RunResult("exec_format", exit_code=0), None, 14),
    (RunResult("compile_error", exit_code=0), None, 6),
    (RunResult("time_limit", exit_signal=9, stdout="ok"), "ok", 5),  # the limit, not the kill signal
    (RunResult("exited", exit_signal=11), None, 7),
    (RunResult("exited", exit_signal=25), None, 8),
    (RunResult("exited", exit_signal=8), None, 9),
    (RunResult("exited", exit_signal=6), None, 10),
    (RunResult("exited", exit_signal=9), None, 12),
    (RunResult("exited", exit_signal=11, exit_code=1), None, 7),  # a signal before an exit code
    (RunResult("exited", exit_code=1, stdout="ok"), "ok", 11),  # NZEC before the output check
    (RunResult("exited", exit_code=255), None, 11),
    (RunResult("exited", exit_code=0, stdout="ok\n"), None, 3),
    (RunResult("exited", exit_code=0, stdout="ok\n"), "ko", 4),
    (RunResult("exited", exit_code=0, stdout="a  \nb\t\n\n\n"), "a\nb", 3),  # trailing whitespace only
    (RunResult("exited", exit_code=0, stdout=" a\nb"), "a\nb", 4),  # leading whitespace counts
    (RunResult("exited", exit_code=0, stdout="a\n\nb"), "a\nb", 4),  # so do empty lines inside
    (RunResult("exited", exit_code=0, stdout=""), "", 3),
    (RunResult("exited", exit_code=0, stdout="x"), "", 4),
    (RunResult("exited", exit_code=None, stdout="x"), None, 3),
])
def test_status_of(result, expected, status):
    assert status_of(result, expected) == status


def test_every_status_is_known_and_named():
    assert sorted(STATUSES) == list(range(1, 15))
    assert STATUSES[3].rest() == {"id": 3, "description": "Accepted"}
    assert STATUSES[3].ws() == {"id": 3, "name": "Accepted", "description": "Submission completed successfully"}


def test_normalize_output():
    assert normalize_output(None) == normalize_output("") == ""
    assert normalize_output("a \r\nb\t \n\n") == "a\nb"  # \r is whitespace at a line's end
    assert normalize_output("  a") == "  a"


# -- rendering and field selection -------------------------------------------------------------------------

SUB = {"token": "t", "status_id": 11, "stdout": "out\n", "stderr": None, "language_id": 71, "time": 0.1234,
       "wall_time": None, "cpu_time_limit": 5, "created_at": 0.5, "finished_at": None, "memory": 10,
       "exit_code": 1, "source_code": "print(1)", "outputs": [], "kernel": None}


def test_parse_fields():
    assert parse_fields(None) == parse_fields("") == parse_fields(" , ") == DEFAULT_FIELDS
    assert parse_fields("*") == JUDGE0_FIELDS and not set(RF_FIELDS) & set(parse_fields("*"))
    assert parse_fields("*,outputs") == [*JUDGE0_FIELDS, "outputs"]
    assert parse_fields("stdout, stdout,token") == ["stdout", "token"]
    for bad in ("stdout,password", "__class__", "stdout\n", "stdout\ntoken", "std out"):
        with pytest.raises(ValueError, match="invalid fields"):
            parse_fields(bad)


def test_render_only_the_fields_asked():
    out = render(SUB, ["token", "status", "time", "wall_time", "cpu_time_limit", "created_at", "finished_at",
                       "language", "stdout", "stderr", "exit_code"], False, {71: "Python (3.11)"})
    assert out == {"token": "t", "status": {"id": 11, "description": "Runtime Error (NZEC)"}, "time": "0.123",
                   "wall_time": None, "cpu_time_limit": "5.0", "created_at": "1970-01-01T00:00:00.500Z",
                   "finished_at": None, "language": {"id": 71, "name": "Python (3.11)"}, "stdout": "out\n",
                   "stderr": None, "exit_code": 1}
    assert list(render(SUB, ["stdout"], False, {})) == ["stdout"]


def test_render_base64_keeps_every_byte():
    raw = b"ok \xff\xfe\x00 end\n"
    sub = {**SUB, "stdout": raw.decode("utf-8", "surrogateescape"), "source_code": "é"}
    out = render(sub, ["stdout", "source_code", "stderr"], True, {})
    assert base64.b64decode(out["stdout"]) == raw
    assert base64.b64decode(out["source_code"]) == "é".encode()
    assert out["stderr"] is None


def test_render_refuses_non_utf8_without_base64():
    sub = {**SUB, "stdout": b"\xff".decode("utf-8", "surrogateescape")}
    with pytest.raises(NotUtf8):
        render(sub, ["stdout"], False, {})
    lone = {**SUB, "stdout": "a\ud800b"}  # not an escaped byte: replaced, never an exception
    assert base64.b64decode(render(lone, ["stdout"], True, {})["stdout"]) == b"a?b"


# -- the runner's status line -----------------------------------------------------------------------------

@pytest.mark.parametrize("line, status, believed", [
    ("exit 0 0.1 100", exited(0), True),
    ("exit 3 0.1 100", exited(3), True),
    ("exit 300 0 0", exited(300), True),  # modulo 256, as the kernel reports it
    ("signal 11 0 0", exited(128 + 11), True),
    ("exit 0 0 0", exited(1), False),  # the sandbox says otherwise
    ("exit 0 0 0", killed(9), False),  # the sandbox was killed: the line is not the reaper's last word
    ("signal 11 0 0", exited(11), False),
    ("exit", exited(0), False),
    ("exit x", exited(0), False),
    ("", exited(0), False),
    ("exec 8 Exec format error", exited(8), False),
    ("done 0", exited(0), False),
])
def test_reaper_exited_as_it_said(line, status, believed):
    assert _reaper_exited_as_it_said(line, status) is believed


def parse(text: str, status: int) -> StepResult:
    res = StepResult()
    _parse_status(text, status, res)
    return res


def test_parse_status_exit_and_rusage():
    res = parse("exit 3 0.25 2048\n", exited(3))
    assert (res.exit_code, res.exit_signal, res.reaper_cpu, res.reaper_rss) == (3, None, 0.25, 2048)


def test_parse_status_signal():
    res = parse("signal 11 0.1 10\n", exited(139))
    assert (res.exit_code, res.exit_signal) == (None, 11)


def test_parse_status_only_the_last_line_counts():
    res = parse("signal 9 0 0\nexec 2 forged\nexit 0 0 0\n", exited(0))  # earlier lines may be forged
    assert (res.exit_code, res.exit_signal, res.exec_error) == (0, None, None)


def test_parse_status_forged_last_line_is_not_believed():
    # the reaper was killed after the program wrote a line of its own: only the sandbox's status counts
    res = parse("exit 0 0 0\n", killed(9))
    assert (res.exit_code, res.exit_signal) == (None, 9)
    res = parse("exit 0 0 0\n", exited(137))
    assert (res.exit_code, res.exit_signal) == (None, 9)
    res = parse("signal 11 0 0\n", exited(1))
    assert (res.exit_code, res.exit_signal) == (1, None)


def test_parse_status_without_a_line():
    assert parse("", exited(0)).exit_code == 0
    assert parse("garbage", exited(2)).exit_code == 2
    assert parse("", killed(15)).exit_signal == 15


def test_parse_status_exec_failure():
    res = parse(f"exec {errno.ENOEXEC} Exec format error\nexit 127 0 0\n", exited(127))
    assert res.exec_error == "cannot execute the program: Exec format error" and res.exit_code is None
    res = parse(f"exec {errno.E2BIG} Argument list too long\nexit 127 0 0\n", exited(127))
    assert res.exec_error == f"cannot execute the program: Argument list too long (errno {errno.E2BIG})"
    res = parse("exec 8 Exec format error\nexit 1 0 0\n", exited(1))  # exec line only with exit 127
    assert (res.exec_error, res.exit_code) == (None, 1)


def test_parse_status_malformed_values_do_not_raise():
    res = parse("exit 0 notcpu notrss\n", exited(0))
    assert (res.exit_code, res.reaper_cpu, res.reaper_rss) == (0, None, None)


def test_parse_status_forged_exec_line_does_not_raise():
    res = parse("exec x forged\nexit 127 0 0\n", exited(127))  # a non-numeric errno on the exec line
    assert res.exit_code == 127 or res.exec_error is not None


def test_client_asks_for_outputs_and_falls_back_to_judge0_fields():
    from runflare_nb import _protocol as p
    from runflare_nb.errors import HTTPError

    assert p.fields_param(None) == "*,outputs"
    refused = HTTPError(400, {"error": "invalid fields: [outputs]"})
    assert p.judge0_fallback(refused, {"fields": p.FINAL_FIELDS, "base64_encoded": "true"}) == \
        {"fields": "*", "base64_encoded": "true"}
    assert p.judge0_fallback(HTTPError(400, {"error": "wait not allowed"}), {"fields": p.FINAL_FIELDS}) is None
    assert p.judge0_fallback(refused, {"fields": "stdout,outputs"}) is None  # the caller's own choice stands


def test_iso_timestamps_match_datetime_formatting() -> None:
    import random
    from datetime import datetime, timezone

    from runflare_server.models import iso

    rng = random.Random(7)
    samples = [0.0, 1.0, 1796204813.6759994, 1319410099.1029994, 1796204813.9999996, 1796204813.0004999]
    samples += [rng.uniform(0, 4e9) for _ in range(2000)] + [round(rng.uniform(1e9, 2e9), 3) for _ in range(2000)]
    for ts in samples:
        expected = datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        assert iso(ts) == expected, ts
    assert iso(None) is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_output_is_sent_at_once_below_the_rate_and_batched_in_a_flood() -> None:
    from runflare_server.kernels.runner import _Coalescer

    clock, sent = FakeClock(), []
    out = _Coalescer(lambda name, text: sent.append((clock.now, name, text)), clock=clock)
    for i in range(10):  # a line every 20 ms, with the jitter of a busy machine: each goes out as it comes
        clock.now += 0.02 + (0.003 if i % 2 else -0.003)
        out.add("stdout", f"{i}\n")
    assert [t for _, _, t in sent] == [f"{i}\n" for i in range(10)] and not out.pending

    sent.clear()
    for i in range(1000):  # a flood: 1000 chunks within 0.1 s
        clock.now += 0.0001
        out.add("stdout" if i % 3 else "stderr", "x")
        out.flush_if_due(clock.now)
    out.flush()
    flushes = len({at for at, _, _ in sent})  # one flush sends a message per run of one stream
    assert flushes <= 0.1 / _Coalescer.SPACING + _Coalescer.BURST + 1
    assert "".join(n[3] * len(t) for _, n, t in sent) == "".join("o" if i % 3 else "e" for i in range(1000))


def test_a_pending_batch_tells_the_reader_when_it_is_due() -> None:
    from runflare_server.kernels.runner import _Coalescer

    clock, sent = FakeClock(), []
    out = _Coalescer(lambda name, text: sent.append(text), clock=clock)
    assert out.timeout(0.05) == 0.05  # nothing pending: the reader's own poll
    for _ in range(_Coalescer.BURST):
        out.add("stdout", "a")
    out.add("stdout", "b")  # the burst is used up: held
    assert sent == ["a"] * _Coalescer.BURST and out.pending
    wait = out.timeout(0.05)
    assert 0 < wait <= _Coalescer.BURST * _Coalescer.SPACING + 1e-9
    clock.now += wait
    out.flush_if_due(clock.now)
    assert sent[-1] == "b" and not out.pending
