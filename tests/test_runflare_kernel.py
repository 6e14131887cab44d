"""The Run-Flare kernel through the Jupyter protocol: jupyter_kernel_test conformance, installed
kernelspecs, and the engine-facing metadata (language, stdin, argv, limits in; result out)."""

from __future__ import annotations

import base64
import json
import os
import tempfile
import time
import unittest
from pathlib import Path

import jupyter_kernel_test
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import start_new_kernel

from runflare_server.engine.runs import languages
from runflare_server.kernels.install import install_kernelspecs

AVAILABLE = {info.id for info in languages.language_infos()}
_PREFIX = tempfile.TemporaryDirectory(prefix="runflare-kernelspecs-")
_ENV = pytest.MonkeyPatch()  # undone in tearDownModule: the suite's environment is left as it was


def setUpModule() -> None:
    install_kernelspecs(prefix=_PREFIX.name)
    _ENV.setenv("JUPYTER_PATH", os.pathsep.join(
        p for p in (str(Path(_PREFIX.name) / "share" / "jupyter"), os.environ.get("JUPYTER_PATH")) if p))


def tearDownModule() -> None:
    _ENV.undo()
    _PREFIX.cleanup()


class RunFlarePythonKernelTests(jupyter_kernel_test.KernelTests):
    """Protocol conformance of the Run-Flare kernel with its Python kernelspec."""

    kernel_name = "runflare-python"
    language_name = "python"
    file_extension = ".py"
    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('test', file=sys.stderr)"
    code_generate_error = "import sys; sys.exit(2)"
    complete_code_samples = ["print(1)"]


class RunFlareCKernelTests(jupyter_kernel_test.KernelTests):
    """The C kernelspec compiles each cell and runs it."""

    kernel_name = "runflare-c"
    language_name = "c"
    file_extension = ".c"
    code_hello_world = '#include <stdio.h>\nint main(){ printf("hello, world\\n"); return 0; }'
    code_stderr = '#include <stdio.h>\nint main(){ fprintf(stderr, "test\\n"); return 0; }'
    code_generate_error = "int main(){ return 7; }"

    @classmethod
    def setUpClass(cls) -> None:
        if 50 not in AVAILABLE:
            raise unittest.SkipTest("gcc not installed")
        super().setUpClass()


class EngineMetadataTests(unittest.TestCase):
    """What ProgramRuns relies on: metadata["runflare"] in the request and in the reply."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.km, cls.kc = start_new_kernel(kernel_name="runflare-python")

    @classmethod
    def tearDownClass(cls) -> None:
        cls.kc.stop_channels()
        cls.km.shutdown_kernel()

    def execute(self, code: str, **rf) -> tuple[dict, list[dict]]:
        msg = self.kc.session.msg("execute_request", {"code": code, "silent": False, "store_history": False,
                                                      "user_expressions": {}, "allow_stdin": False},
                                  metadata={"runflare": rf})
        self.kc.shell_channel.send(msg)
        iopub = []
        while True:
            m = self.kc.get_iopub_msg(timeout=60)
            if m["parent_header"].get("msg_id") != msg["header"]["msg_id"]:
                continue
            if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                break
            iopub.append(m)
        while True:  # the reply to this request: a stray one (from an earlier test, a timeout) is not it
            reply = self.kc.get_shell_msg(timeout=60)
            if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                return reply, iopub

    def test_language_stdin_args_in_metadata(self):
        if 46 not in AVAILABLE:
            self.skipTest("bash not installed")
        reply, iopub = self.execute('read x; echo "$x|$1|$2"', language_id=46, stdin="in\n", args="a 'b c'")
        rf = reply["metadata"]["runflare"]
        self.assertEqual(rf["outcome"], "exited")
        self.assertEqual(rf["exit_code"], 0)
        self.assertEqual(base64.b64decode(rf["stdout_b64"]), b"in|a|b c\n")
        self.assertGreater(rf["time"], 0)
        self.assertGreater(rf["memory"], 0)
        types = [m["msg_type"] for m in iopub]
        self.assertIn("runflare_stage", types)
        self.assertEqual("".join(m["content"]["text"] for m in iopub if m["msg_type"] == "stream"), "in|a|b c\n")

    def test_limits_in_metadata(self):
        reply, _ = self.execute("while True: pass", language_id=71,
                                limits={"cpu_time_limit": 0.3, "cpu_extra_time": 0.2, "wall_time_limit": 5})
        rf = reply["metadata"]["runflare"]
        self.assertEqual(rf["outcome"], "time_limit")
        self.assertEqual(reply["content"]["status"], "error")

    def test_compile_error_reply(self):
        if 50 not in AVAILABLE:
            self.skipTest("gcc not installed")
        reply, _ = self.execute("int main( {", language_id=50)
        rf = reply["metadata"]["runflare"]
        self.assertEqual(rf["outcome"], "compile_error")
        self.assertIn("error", rf["compile_output"])

    def test_an_engine_request_publishes_only_what_the_engine_reads(self):
        reply, iopub = self.execute("print('x')", language_id=71)
        self.assertEqual(reply["content"]["status"], "ok")
        # no busy status, no execute_input: the stage, the output (in one chunk or more), then idle (which
        # ended the loop)
        types = [m["msg_type"] for m in iopub]
        self.assertEqual(types[0], "runflare_stage")
        self.assertEqual(set(types[1:]), {"stream"})

    def test_a_plain_jupyter_request_still_gets_the_whole_protocol(self):
        msg_id = self.kc.execute("print('y')")
        types = []
        while True:
            m = self.kc.get_iopub_msg(timeout=60)
            if m["parent_header"].get("msg_id") != msg_id:
                continue
            types.append((m["msg_type"], m["content"].get("execution_state")))
            if types[-1] == ("status", "idle"):
                break
        self.assertEqual(types[0], ("status", "busy"))
        self.assertIn(("execute_input", None), types)
        self.assertIn(("stream", None), types)
        while True:
            reply = self.kc.get_shell_msg(timeout=60)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        self.assertEqual(reply["content"]["status"], "ok")

    def test_a_stray_reply_is_not_taken_for_the_next_one(self):
        self.kc.execute("print('stray')", silent=True)  # its reply is never read here
        reply, iopub = self.execute("print('mine')", language_id=71)
        self.assertEqual(base64.b64decode(reply["metadata"]["runflare"]["stdout_b64"]), b"mine\n")
        # the chunks may arrive split ("mine", "\n"): what counts is that they are this request's, in order
        self.assertEqual("".join(m["content"]["text"] for m in iopub if m["msg_type"] == "stream"), "mine\n")

    def test_output_and_control_statuses_from_two_threads_all_arrive_whole(self):
        # the run's output is published by the main thread, a control request's statuses by the control
        # thread, both straight onto the one iopub socket: taking turns, so every message arrives intact
        lines = 3000
        msg = self.kc.session.msg("execute_request", {"code": f"for i in range({lines}): print(i)",
                                                      "silent": False, "store_history": False,
                                                      "user_expressions": {}, "allow_stdin": False},
                                  metadata={"runflare": {"language_id": 71}})
        self.kc.shell_channel.send(msg)
        control_ids = set()
        for _ in range(40):
            request = self.kc.session.msg("kernel_info_request")
            control_ids.add(request["header"]["msg_id"])
            self.kc.control_channel.send(request)
        text, control_statuses = [], []
        while True:
            m = self.kc.get_iopub_msg(timeout=60)
            parent = m["parent_header"].get("msg_id")
            if parent in control_ids and m["msg_type"] == "status":
                control_statuses.append((parent, m["content"]["execution_state"]))
            elif parent == msg["header"]["msg_id"]:
                if m["msg_type"] == "stream":
                    text.append(m["content"]["text"])
                elif m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                    break
        replies = {self.kc.get_control_msg(timeout=60)["parent_header"]["msg_id"] for _ in control_ids}
        while True:
            reply = self.kc.get_shell_msg(timeout=60)
            if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                break
        self.assertEqual("".join(text), "".join(f"{i}\n" for i in range(lines)))
        self.assertEqual(replies, control_ids)
        while len(control_statuses) < 2 * len(control_ids):  # the last ones may come after the run's idle
            m = self.kc.get_iopub_msg(timeout=60)
            if m["parent_header"].get("msg_id") in control_ids:
                control_statuses.append((m["parent_header"]["msg_id"], m["content"]["execution_state"]))
        self.assertEqual(sorted(control_statuses), sorted((i, s) for i in control_ids for s in ("busy", "idle")))
        self.assertEqual(reply["content"]["status"], "ok")

    def test_kernelspecs_installed_for_available_languages(self):
        specs = KernelSpecManager().find_kernel_specs()
        for lang in languages.LANGUAGES:
            if lang.id in AVAILABLE:
                self.assertIn(lang.kernelspec, specs)
                spec = json.loads((Path(specs[lang.kernelspec]) / "kernel.json").read_text())
                self.assertEqual(spec["env"]["RUNFLARE_LANGUAGE"], str(lang.id))
                self.assertTrue(spec["display_name"].endswith("(Run-Flare)"))
        self.assertEqual(json.loads((Path(specs["runflare-python"]) / "kernel.json").read_text())["display_name"],
                         "Python (Run-Flare)")


def test_the_kernel_app_publishes_on_a_locked_pub_socket_and_decodes_with_the_lean_session(monkeypatch, tmp_path):
    """The app class ``main`` launches, made and initialised here (without starting its loop)."""
    import zmq
    from ipykernel.kernelapp import IPKernelApp

    from runflare_server.engine.jupyter.lean_session import LeanSession
    from runflare_server.kernels import runflare_kernel

    launched = {}
    monkeypatch.setattr(IPKernelApp, "launch_instance",
                        classmethod(lambda cls, **kw: launched.update(cls=cls, kw=kw)))
    monkeypatch.setenv("RUNFLARE_SANDBOX", "none")  # no private mount: this is the test's own process
    runflare_kernel.main()
    app = launched["cls"](connection_file=str(tmp_path / "c.json"), transport="ipc", ip=str(tmp_path / "k"))
    try:
        assert isinstance(app.session, LeanSession)
        app.context = zmq.Context()
        app.init_iopub(app.context)
        assert app.iopub_thread is None
        assert isinstance(app.iopub_socket, runflare_kernel.LockedSocket)
        assert app.iopub_socket.socket.type == zmq.PUB
    finally:
        app.iopub_socket.close(0)
        app.context.term()
        launched["cls"].clear_instance()


def test_a_message_published_after_the_kernel_closed_its_iopub_socket_is_dropped(tmp_path):
    """ipykernel's control thread publishes a shutdown request's idle status after the main thread may have
    closed the app (and its iopub socket): that message has no reader and is dropped, not a traceback."""
    import zmq

    from runflare_server.kernels.runflare_kernel import LockedSocket

    context = zmq.Context()
    sub, pub = context.socket(zmq.SUB), LockedSocket(context.socket(zmq.PUB))
    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        pub.socket.bind(f"ipc://{tmp_path}/iopub")
        sub.connect(f"ipc://{tmp_path}/iopub")
        deadline = time.monotonic() + 10
        while not sub.poll(10):  # until the subscription is through
            assert time.monotonic() < deadline
            pub.send_multipart([b"status", b"idle"])
        assert sub.recv_multipart()[0] == b"status"
        pub.close(0)
        assert pub.send_multipart([b"status", b"idle"]) is None
        with pytest.raises(zmq.ZMQError):  # what the kernel's publisher did before
            pub.socket.send_multipart([b"status", b"idle"])
    finally:
        sub.close(0)
        pub.close(0)
        context.term()


def test_a_record_every_handler_drops_is_never_made():
    """traitlets leaves an app's logger at DEBUG and filters in its handler; the Run-Flare kernel's logger
    refuses what all of its handlers would drop, and still passes on what one of them takes."""
    import logging

    from runflare_server.kernels.runflare_kernel import refuse_what_handlers_drop

    made = []

    class Counting(logging.Handler):
        def handle(self, record: logging.LogRecord) -> bool:
            made.append(record.levelno)
            return super().handle(record)

        def emit(self, record: logging.LogRecord) -> None:
            pass

    parent = logging.getLogger("rf-test-parent")
    log = logging.getLogger("rf-test-parent.app")
    log.propagate, log.level = False, logging.DEBUG
    log.handlers = [Counting(logging.WARNING)]
    refuse_what_handlers_drop(log)
    log.debug("dropped")
    log.warning("kept")
    assert made == [logging.WARNING]

    log.setLevel(logging.DEBUG)
    log.propagate = True  # a parent's handler that takes DEBUG: the logger stays open for it
    parent.handlers = [Counting(logging.DEBUG)]
    refuse_what_handlers_drop(log)
    assert log.isEnabledFor(logging.DEBUG)

    log.setLevel(logging.NOTSET)  # inherits WARNING from the root: never lowered by a handler's DEBUG
    log.propagate, log.handlers, parent.handlers = False, [Counting(logging.DEBUG)], []
    refuse_what_handlers_drop(log)
    assert not log.isEnabledFor(logging.INFO)

    log.handlers = [Counting(logging.NOTSET)]  # a handler that takes everything: left as it is
    log.setLevel(logging.DEBUG)
    refuse_what_handlers_drop(log)
    assert log.isEnabledFor(logging.DEBUG)


def test_the_kernel_app_refuses_debug_records_after_its_set_up(monkeypatch):
    """The app's ``initialize`` ends with ``refuse_what_handlers_drop``: at the default log level its
    logger refuses debug records; with ``--debug`` its handler takes them and the logger lets them through.
    (The base's set-up, which binds sockets and starts threads, is not run here.)"""
    import logging

    from ipykernel.kernelapp import IPKernelApp

    from runflare_server.kernels import runflare_kernel

    launched = {}
    monkeypatch.setattr(IPKernelApp, "launch_instance",
                        classmethod(lambda cls, **kw: launched.update(cls=cls, kw=kw)))
    monkeypatch.setattr(IPKernelApp, "initialize", lambda self, argv=None: None)
    monkeypatch.setenv("RUNFLARE_SANDBOX", "none")
    runflare_kernel.main()
    for level, debug in ((logging.WARNING, False), (logging.DEBUG, True)):
        app = launched["cls"](log_level=level)
        try:
            assert app.log.isEnabledFor(logging.DEBUG)  # as traitlets leaves it
            app.initialize([])
            assert app.log.isEnabledFor(logging.DEBUG) is debug
            assert app.log.isEnabledFor(logging.WARNING)
        finally:
            launched["cls"].clear_instance()
