"""The ``runflare-sandbox`` kernel provisioner through jupyter_client's own managers, nbclient and
jupyter_kernel_test: a sandboxed copy of the python3 kernelspec (``runflare kernels install --sandboxed``)
runs as a slot uid, with a read-only /proc/sys, the seccomp filter, no network, none of the host's files,
and its limits; shutting it down leaves no process, dir, cgroup or uid lease behind.

Real components only (bubblewrap, cgroups, ipykernel); run as root, as CI does."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

import jupyter_kernel_test
import nbformat
import psutil
import pytest
from conftest import wait_until
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager, start_new_kernel
from jupyter_client.provisioning import KernelProvisionerFactory
from nbclient import NotebookClient

from runflare_server.cli import build_parser
from runflare_server.cli import main as cli_main
from runflare_server.engine.jupyter.adapters import PythonKernel
from runflare_server.engine.jupyter.fork_server import ForkServer
from runflare_server.engine.jupyter.provisioner import PROVISIONER_NAME, RunflareSandboxProvisioner
from runflare_server.engine.sandbox import policy
from runflare_server.engine.sandbox.process import scratch_base

REPO_FILE = Path(__file__).resolve().parents[1] / "pyproject.toml"
SMALL = {"memory_limit": 160_000, "max_file_size": 1024, "max_processes_and_or_threads": 64}

_PREFIX = tempfile.TemporaryDirectory(prefix="runflare-sandboxed-specs-")
_ENV = pytest.MonkeyPatch()  # undone in tearDownModule: the suite's environment is left as it was


def setUpModule() -> None:
    if os.geteuid() != 0:
        pytest.skip("the sandbox tests run as root (as CI does)", allow_module_level=True)
    prefix = _PREFIX.name
    assert cli_main(["kernels", "install", "--sandboxed", "python3", "--prefix", prefix]) == 0
    assert cli_main(["kernels", "install", "--sandboxed", "python3", "--name", "python3-small", "--prefix", prefix,
                     "--memory-limit", str(SMALL["memory_limit"]), "--max-file-size", str(SMALL["max_file_size"]),
                     "--max-processes", str(SMALL["max_processes_and_or_threads"])]) == 0
    _ENV.setenv("JUPYTER_PATH", os.pathsep.join(
        p for p in (str(Path(prefix) / "share" / "jupyter"), os.environ.get("JUPYTER_PATH")) if p))
    # the same spec forked from a fork server, on the server's lean command line: its kernel adopts the
    # shell the fork server built before any fork
    kernels = Path(prefix) / "share" / "jupyter" / "kernels"
    spec = json.loads((kernels / "python3-sandboxed" / "kernel.json").read_text())
    spec["argv"] = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}", *PythonKernel.LEAN_ARGS]
    spec["metadata"]["kernel_provisioner"]["config"]["fork_server"] = str(Path(prefix) / "fork-server")
    (kernels / "python3-forked").mkdir()
    (kernels / "python3-forked" / "kernel.json").write_text(json.dumps(spec))


def tearDownModule() -> None:
    _ENV.undo()
    _PREFIX.cleanup()


def kernel_dirs() -> set[Path]:
    """The per-kernel dirs this process made (``scratch.private_dir("kernel", ...)``)."""
    return set(scratch_base().glob(f"runflare-kernel-{os.getpid()}-*"))


def lease_free(uid: int) -> bool:
    fd = os.open(policy.LEASE_DIR / str(uid), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def run(kc, code: str, timeout: float = 30) -> tuple[dict, str]:
    """Execute ``code``; returns the reply's content and the stdout it printed."""
    out: list[str] = []

    def hook(msg: dict) -> None:
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])

    reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    return reply["content"], "".join(out)


# ---------------------------------------------------------------- registration and the CLI


def test_entry_point_and_installed_spec() -> None:
    spec = KernelSpecManager().get_kernel_spec("python3-sandboxed")
    assert spec.display_name == "Python 3 (sandboxed)"
    assert spec.argv == KernelSpecManager().get_kernel_spec("python3").argv
    stanza = spec.metadata["kernel_provisioner"]
    assert stanza["provisioner_name"] == PROVISIONER_NAME
    assert set(stanza["config"]) >= {"memory_limit", "max_processes_and_or_threads", "max_file_size", "cpu_time_limit"}
    assert (Path(spec.resource_dir) / "logo-64x64.png").exists()  # the original's resources come along
    assert Path(spec.resource_dir).is_relative_to(_PREFIX.name)
    factory = KernelProvisionerFactory.instance()
    assert factory.is_provisioner_available(spec)
    assert factory.provisioners[PROVISIONER_NAME].load() is RunflareSandboxProvisioner
    small = KernelSpecManager().get_kernel_spec("python3-small").metadata["kernel_provisioner"]["config"]
    assert small["memory_limit"] == SMALL["memory_limit"] and small["max_file_size"] == SMALL["max_file_size"]
    # the older command keeps its options
    args = build_parser().parse_args(["install-kernels", "--prefix", "/x"])
    assert (args.command, args.prefix) == ("install-kernels", "/x")
    assert cli_main(["kernels", "install", "--sandboxed", "no-such-kernel", "--prefix", _PREFIX.name]) == 2


# ---------------------------------------------------------------- one sandboxed kernel


ISOLATION_PROBE = f"""
import ctypes, errno, json, os, socket
facts = {{"uid": os.getuid(), "gid": os.getgid(), "cwd": os.getcwd(), "ifaces": socket.if_nameindex(),
          "repo_file": os.path.exists({str(REPO_FILE)!r}), "home": os.listdir("/home") if os.path.exists("/home") else None}}
try:
    open("/proc/sys/kernel/core_pattern", "w").write("|/bin/true")
    facts["core_pattern"] = "written"
except OSError as e:
    facts["core_pattern"] = errno.errorcode[e.errno]
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
KEYCTL = 250  # x86-64
r = libc.syscall(KEYCTL, 0, 0, 0, 0, 0)
facts["keyctl"] = errno.errorcode.get(ctypes.get_errno()) if r == -1 else "allowed"
try:
    socket.create_connection(("127.0.0.1", 5432), timeout=2).close()  # the host's PostgreSQL port
    facts["loopback_5432"] = "connected"
except OSError as e:
    facts["loopback_5432"] = errno.errorcode.get(e.errno, str(e))
print(json.dumps(facts))
"""


def test_kernel_manager_starts_a_sandboxed_kernel_and_leaves_nothing() -> None:
    before = kernel_dirs()
    km, kc = start_new_kernel(kernel_name="python3-sandboxed", startup_timeout=60)
    prov = km.provisioner
    try:
        assert isinstance(prov, RunflareSandboxProvisioner)
        assert km.transport == "ipc" and km.ip.startswith(str(prov.kernel_dir))
        conn = json.loads((prov.kernel_dir / "connection.json").read_text())
        assert conn["ip"] == "/run/kernel/k" and conn["transport"] == "ipc"
        uid = prov.lease.uid
        assert uid in policy.UidRange.from_env() and not lease_free(uid)
        kernel_procs = prov.kernel_processes()
        assert kernel_procs and all(p.uids().real == uid for p in kernel_procs)
        all_procs = prov.processes()
        if prov.cgroup is not None:  # the whole tree sits in its own cgroup from its start
            assert {p.pid for p in all_procs} <= set(prov.cgroup.pids())

        reply, out = run(kc, ISOLATION_PROBE)
        assert reply["status"] == "ok", reply
        facts = json.loads(out)
        assert facts["uid"] == uid != 0 and facts["gid"] == uid
        assert facts["cwd"] == "/sandbox"
        assert facts["core_pattern"] == "EROFS"
        assert facts["keyctl"] == "EPERM"
        assert [name for _, name in facts["ifaces"]] == ["lo"]
        assert facts["loopback_5432"] == "ECONNREFUSED"  # the sandbox's own loopback: nothing listens
        assert facts["repo_file"] is False and facts["home"] is None

        # an interrupt reaches the kernel inside the sandbox (not just bubblewrap)
        msg_id = kc.execute("import time; time.sleep(60)")
        time.sleep(0.5)
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=20)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
        assert km.is_alive()
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    gone, alive = psutil.wait_procs(all_procs, timeout=30)  # a bound for a loaded machine, not a measure
    assert not alive
    assert not [p for p in psutil.Process().children(recursive=True) if p.uids().real == uid]
    assert kernel_dirs() == before
    # the uid went back (another test run may lease it again at once, so the lock itself is not checked)
    assert prov.lease is None and prov.cgroup is None and prov.kernel_dir is None and not km.has_kernel


PLANT = """import os
for name in ("connection.json", "launch.json", "planted"):
    path = "/run/kernel/" + name
    if os.path.lexists(path):
        os.remove(path)
    os.symlink({victim!r}, path)
print("planted")
"""


def test_a_restart_trusts_nothing_the_kernel_left_in_its_dir(tmp_path: Path) -> None:
    # the kernel can write its connection dir: links to a host file there must not make the server, as
    # root, write, chmod or chown that file when the kernel restarts (jupyter_server's auto-restart)
    victim = tmp_path / "victim"
    victim.write_text("the host's data")
    victim.chmod(0o644)
    km, kc = start_new_kernel(kernel_name="python3-sandboxed", startup_timeout=60)
    try:
        reply, out = run(kc, PLANT.format(victim=str(victim)))
        assert reply["status"] == "ok" and out == "planted\n", reply
        km.restart_kernel(now=True)
        kc.wait_for_ready(timeout=60)
        reply, out = run(kc, "import os; print(sorted(os.listdir('/run/kernel')))")
        assert reply["status"] == "ok" and "planted" not in out, out  # a fresh dir
        msg_id = kc.execute("import time; time.sleep(60)")  # an interrupt still reaches the restarted kernel
        wait_until(lambda: km.provisioner.kernel_processes(), timeout=10)
        time.sleep(0.5)
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=20)
        assert reply["parent_header"]["msg_id"] == msg_id and reply["content"]["ename"] == "KeyboardInterrupt"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    stat = victim.stat()
    assert victim.read_text() == "the host's data"
    assert (stat.st_uid, stat.st_gid, stat.st_mode & 0o777) == (0, 0, 0o644)


def test_memory_limit_kills_the_kernel_with_a_clear_reason() -> None:
    before = kernel_dirs()
    km = KernelManager(kernel_name="python3-small")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        prov = km.provisioner
        assert prov.memory_limit == SMALL["memory_limit"]
        msg_id = kc.execute("x = b'x' * (400 << 20)")  # 400 MB, touched, against a 156 MB limit
        if prov.limit_mechanism == "rlimit":  # RLIMIT_AS: the allocation fails inside the kernel
            reply = kc.get_shell_msg(timeout=30)
            assert reply["content"]["ename"] == "MemoryError"
            return
        wait_until(lambda: not km.is_alive(), timeout=30)
        assert prov.exit_reason == "memory limit"
        replies = []
        with contextlib.suppress(queue.Empty):
            while True:
                replies.append(kc.get_shell_msg(timeout=0.2)["parent_header"].get("msg_id"))
        assert msg_id not in replies  # no execute_reply: the kernel was killed, not an exception
        # what Jupyter Server's restarter does next: the same provisioner starts it again, limits and all
        kernel_dir, uid = prov.kernel_dir, prov.lease.uid
        km.restart_kernel(now=True)
        kc.wait_for_ready(timeout=60)
        assert (prov.kernel_dir, prov.lease.uid) == (kernel_dir, uid) and prov.exit_reason is None
        reply, out = run(kc, "import os; print(os.getuid())")
        assert out == f"{uid}\n"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert kernel_dirs() == before


# ---------------------------------------------------------------- nbclient


def test_nbclient_runs_a_notebook_in_the_sandbox() -> None:
    before = kernel_dirs()
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import os, socket\nprint(os.getuid() != 0, [n for _, n in socket.if_nameindex()])"),
        nbformat.v4.new_code_cell("try:\n    shadow = open('/etc/shadow').read()\nexcept OSError as e:\n    shadow = repr(e)\n"
                                  f"print(os.path.exists({str(REPO_FILE)!r}), 'root:' in shadow)"),
        nbformat.v4.new_code_cell("from IPython.display import HTML\nHTML('<b>sandboxed</b>')"),
        nbformat.v4.new_code_cell("open('big.bin', 'wb').write(b'x' * (4 << 20))"),  # over max_file_size
    ]
    NotebookClient(nb, timeout=60, kernel_name="python3-small", allow_errors=True).execute()
    assert nb.cells[0].outputs[0]["text"] == "True ['lo']\n"
    assert nb.cells[1].outputs[0]["text"] == "False False\n"  # no repo files; /etc/shadow masked
    assert nb.cells[2].outputs[0]["data"]["text/html"] == "<b>sandboxed</b>"
    err = nb.cells[3].outputs[0]
    assert err["output_type"] == "error" and err["ename"] == "OSError" and "File too large" in err["evalue"]
    assert kernel_dirs() == before


# ---------------------------------------------------------------- protocol conformance


class SandboxedPythonKernelTests(jupyter_kernel_test.KernelTests):
    """jupyter_kernel_test on the sandboxed python spec (one kernel for the class)."""

    kernel_name = "python3-sandboxed"
    language_name = "python"
    file_extension = ".py"
    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('test', file=sys.stderr)"
    completion_samples = [{"text": "zi", "matches": {"zip"}}]
    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n"]
    incomplete_code_samples = ["print('''hello", "def f(x):\n  x*2"]
    code_page_something = "zip?"
    code_generate_error = "raise ValueError('sandboxed')"
    code_execute_result = [{"code": "1+2+3", "result": "6"}]
    code_display_data = [{"code": "from IPython.display import HTML; display(HTML('<b>x</b>'))", "mime": "text/html"}]
    code_inspect_sample = "zip"
    code_clear_output = "from IPython.display import clear_output; clear_output()"

    @classmethod
    def tearDownClass(cls) -> None:
        prov = cls.km.provisioner
        super().tearDownClass()
        assert prov.kernel_dir is None and prov.lease is None


class ForkedPythonKernelTests(SandboxedPythonKernelTests):
    """jupyter_kernel_test on a kernel forked from the fork server with the lean command line: the kernel
    whose shell is the one the fork server built before the fork."""

    kernel_name = "python3-forked"

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        prov = cls.km.provisioner
        assert prov.forked, "the kernel was not forked"
        reply = cls.kc.execute_interactive(
            "ip = get_ipython(); print(ip.kernel.shell is ip, ip.history_manager.enabled, ip.colors)", timeout=30,
            output_hook=cls._output)
        assert reply["content"]["status"] == "ok"

    _printed: ClassVar[list[str]] = []

    @classmethod
    def _output(cls, msg: dict) -> None:
        if msg["msg_type"] == "stream":
            cls._printed.append(msg["content"]["text"])

    def test_the_forked_kernel_runs_on_the_lean_shell(self) -> None:
        assert "".join(self._printed) == "True False nocolor\n"

    @classmethod
    def tearDownClass(cls) -> None:
        runtime = cls.km.provisioner.fork_server
        super().tearDownClass()
        ForkServer.shared(runtime).close()
