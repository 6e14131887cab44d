"""Kernel messages are bounded before they are decoded (ZMQ MAXMSGSIZE on the client's sockets).

A kernel-run program that publishes one huge message (bypassing the kernel's own output cap, as a hostile
program would) ends with SIGXFSZ and "kernel output message exceeded N bytes"; the message never reaches
the event loop (no display, no stream of it). A program-run kernel whose reply exceeds the bound ends the
run as an internal error with the same message, and the kernel is replaced. Real kernels, no mocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from runflare_server.engine.interface import Limits, RunRequest, RunResult
from runflare_server.engine.jupyter.bounded_client import BoundedKernelClient, message_bound
from runflare_server.engine.runs.kernel_runs import KernelRuns
from runflare_server.engine.runs.program_runs import BlockingProgramRuns

pytestmark = pytest.mark.timeout(180)

CAP = 1 << 20  # the default output cap
BOUND = 4 * CAP + 64 * 1024

# Sends one iopub message straight through the kernel's session (no output cap of the kernel applies).
SEND = """
k = get_ipython().kernel
k.session.send(k.iopub_socket, {kind!r}, {content}, parent=k.get_parent("shell"))
"""


class Engine:
    """A started KernelRuns on its own event loop."""

    def __init__(self, **kw) -> None:
        self.loop = asyncio.new_event_loop()
        self.engine = KernelRuns(**kw)
        self.loop.run_until_complete(self.engine.start())

    def run(self, code: str, **kw) -> tuple[RunResult, list[dict]]:
        events: list[dict] = []
        request = RunRequest(token="t", source_code=code, language_id=1071, **kw)
        return self.loop.run_until_complete(self.engine.run(request, events.append)), events

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.stop())
        self.loop.close()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    e = Engine(pool_sizes={"python3": 1}, runtime_dir=tmp_path_factory.mktemp("rt"), max_output_bytes=CAP)
    e.loop.run_until_complete(e.engine.wait_ready(60))
    yield e
    e.close()


def test_bound_is_derived_from_the_output_cap(tmp_path: Path) -> None:
    import zmq

    assert message_bound(CAP) == BOUND
    clients = [BoundedKernelClient(max_message_bytes=bound) for bound in (12345, 12345, 23456)]
    a, b, other = clients
    assert a.context is b.context and other.context is not a.context  # one context per bound
    sock = a.context.socket(zmq.SUB)
    assert sock.getsockopt(zmq.MAXMSGSIZE) == 12345  # every socket of the context
    sock.close()
    for client in clients:
        client.load_connection_info({"transport": "ipc", "ip": str(tmp_path / "k"), "shell_port": 1,
                                     "iopub_port": 2, "stdin_port": 3, "hb_port": 4, "control_port": 5,
                                     "key": "k", "signature_scheme": "hmac-sha256"})
        client.start_channels(hb=False)
    sockets = [a.shell_channel.socket, a.iopub_channel.socket, a.stdin_channel.socket,
               *(monitor for _, monitor in a._watched)]
    assert len(sockets) == 6 and all(s.getsockopt(zmq.MAXMSGSIZE) == 12345 for s in sockets[:3])
    a.stop_channels()
    assert all(s.closed for s in sockets) and not a.context.closed  # its sockets and monitors; not b's context
    assert b.shell_channel.socket is not None and not b.shell_channel.socket.closed
    for client in (b, other):
        client.stop_channels()


def test_huge_display_is_refused_undecoded(engine: Engine) -> None:
    code = "print('before', flush=True)\n" + SEND.format(kind="display_data",
                                              content='{"data": {"text/plain": "x" * 30_000_000}, "metadata": {}}')
    code += "print('after')\n"
    result, events = engine.run(code)
    assert result.message == f"kernel output message exceeded {BOUND} bytes", result
    assert result.outcome == "exited" and result.exit_signal == 25 and result.exit_code is None
    assert result.outputs == []  # the 30 MB payload never reached a decode
    assert not [e for e in events if e["kind"] == "display"]
    assert result.stdout.startswith("before\n")


def test_huge_stream_is_refused_undecoded(engine: Engine) -> None:
    code = SEND.format(kind="stream", content='{"name": "stdout", "text": "y" * 20_000_000}')
    result, events = engine.run(code)
    assert result.message == f"kernel output message exceeded {BOUND} bytes", result
    assert result.exit_signal == 25
    assert "y" not in result.stdout
    assert sum(len(e.get("text", "")) for e in events if e["kind"] == "stream") < BOUND


def test_message_under_the_bound_hits_the_output_cap(engine: Engine) -> None:
    # 2 MB: under the message bound, so it is decoded (bounded work) and then cut by the output cap.
    code = SEND.format(kind="display_data", content='{"data": {"text/plain": "z" * 2_000_000}, "metadata": {}}')
    result, _ = engine.run(code)
    assert result.exit_signal == 25
    assert result.message.startswith("output truncated"), result.message
    assert result.outputs == []


def test_ordinary_runs_are_untouched(engine: Engine) -> None:
    result, events = engine.run("print('ok')\ndisplay({'text/plain': 'small'}, raw=True)")
    assert result.outcome == "exited" and result.exit_code == 0 and result.message is None, result
    assert result.stdout == "ok\n"
    assert result.outputs == [{"data": {"text/plain": "small"}, "metadata": {}}]


def test_program_run_reply_over_the_bound(tmp_path) -> None:
    """An engine sized for a 1 KiB output cap refuses a reply carrying 1 MB of output (its bound is
    4 KiB + 64 KiB), ends the run as an internal error saying why, and replaces the kernel."""
    runs = tmp_path / "runs"
    runs.mkdir()
    with BlockingProgramRuns(1, runs_dir=str(runs), max_output_bytes=1024) as pr:
        bound = pr.engine.max_message_bytes
        assert bound == 4 * 1024 + 64 * 1024
        big = RunRequest(token="big", source_code="import sys; sys.stdout.write('q' * 1_000_000)", language_id=71,
                         limits=Limits(max_output_bytes=CAP))
        result, events = pr.run(big)
        assert result.outcome == "internal", result
        assert result.message == f"kernel output message exceeded {bound} bytes"
        assert result.stdout == ""  # the reply carrying it was refused undecoded
        # the live stream messages were each under the bound, so they were delivered
        assert all(len(e["text"]) <= bound for e in events if e["kind"] == "stream")
        # the kernel was replaced: the next run works
        ok, _ = pr.run(RunRequest(token="ok", source_code="print('fine')", language_id=71))
        assert ok.outcome == "exited" and ok.stdout == "fine\n", ok
        assert pr.engine.stats["kernels_replaced"] >= 1


def test_next_msg_times_out_without_taking_a_later_message() -> None:
    """``next_msg`` on a real kernel: a receive that times out or is cancelled takes no message; the reply
    arriving after it reaches the next call, decoded."""
    from jupyter_client.manager import AsyncKernelManager

    async def scenario() -> None:
        km = AsyncKernelManager(kernel_name="python3", client_factory=BoundedKernelClient)
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=60)
            with pytest.raises(TimeoutError):
                await kc.next_msg("shell", 0.05)  # nothing sent: nothing comes
            msg_id = kc.execute("import time; time.sleep(0.5); 6 * 7")
            with pytest.raises(TimeoutError):
                await kc.next_msg("shell", 0.1)  # the reply is on its way
            waiting = asyncio.ensure_future(kc.next_msg("shell"))
            await asyncio.sleep(0.05)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            reply = await kc.next_msg("shell", 30)
            assert reply["parent_header"]["msg_id"] == msg_id and reply["content"]["status"] == "ok"
            while (m := await kc.next_msg("iopub", 30))["msg_type"] != "execute_result":
                pass
            assert m["content"]["data"]["text/plain"] == "42"
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)

    asyncio.run(scenario())
