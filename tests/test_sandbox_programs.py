"""The programs that run inside a sandbox (the ipykernel fork server, the ipc<->tcp bridge): self-contained
source passed as ``python -c`` (nothing of the server's tree), and their pure parts."""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import skip_or_fail, wait_until
from ipykernel.kernelapp import IPKernelApp
from jupyter_client.blocking import BlockingKernelClient

from runflare_server.engine.jupyter.adapters import PythonKernel
from runflare_server.engine.sandbox import kernel_sandbox as sb
from runflare_server.engine.sandbox import tcp_bridge, zygote

ALLOWED_IMPORTS = {"zygote": {"ipykernel", "IPython", "traitlets"}, "tcp_bridge": {"zmq"}}


@pytest.mark.parametrize("name", sorted(ALLOWED_IMPORTS))
def test_program_imports_nothing_of_the_server(name: str) -> None:
    tree = ast.parse(sb.program_source(name))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{name}: relative import {ast.unparse(node)}"
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
    assert imported - ALLOWED_IMPORTS[name] <= set(sys.stdlib_module_names), imported
    assert "runflare_server" not in imported


@pytest.mark.parametrize("name", sorted(ALLOWED_IMPORTS))
def test_program_source_is_the_module_file(name: str) -> None:
    module = {"zygote": zygote, "tcp_bridge": tcp_bridge}[name]
    assert sb.program_source(name) == Path(module.__file__).read_text()
    # as `python -c` runs it: no package, no __file__; defining it starts nothing
    namespace: dict = {"__name__": "not_main"}
    exec(compile(sb.program_source(name), "<string>", "exec"), namespace)
    assert callable(namespace["main"])


def test_launch_lines_carry_the_source_not_a_path() -> None:
    argv = sb.bridged(["deno", "jupyter", "--kernel", "--conn", "/run/kernel/t.json"], "/run/kernel/c.json",
                      "/run/kernel/t.json")
    assert argv[:3] == [sys.executable, "-c", sb.program_source("tcp_bridge")]
    assert argv[3:6] == ["/run/kernel/c.json", "/run/kernel/t.json", "--"]
    assert not any("runflare_server" in a for a in argv[3:])


def test_program_source_refuses_a_missing_module() -> None:
    with pytest.raises(RuntimeError, match="no source file"):
        sb.program_source("no_such_program")


# ------------------------------------------------------------------ zygote


def test_parse_command() -> None:
    assert zygote.parse_command("a1b2c3 7\n") == ("a1b2c3", 7)
    for bad in ("", "a1b2", "a1 b2", "a/b 3", "../x 3", "a 1 2"):
        with pytest.raises(ValueError):
            zygote.parse_command(bad)


def _status_of(code: str) -> int:
    pid = os.fork()
    if pid == 0:
        if code == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(int(code))
    return os.waitpid(pid, 0)[1]


@pytest.mark.parametrize(("child", "exact", "byte"), [("0", 0, 0), ("3", 3, 3), ("255", 255, 255), ("kill", -9, 137)])
def test_exit_statuses(child: str, exact: int, byte: int) -> None:
    assert zygote.exact_status(_status_of(child)) == exact
    assert zygote.exit_byte(exact) == byte
    assert zygote.exit_byte(-15) == 143


def test_capabilities_left() -> None:
    empty = "".join(f"{f}:\t0000000000000000\n" for f in zygote.CAP_FIELDS)
    assert zygote.capabilities_left(empty) == []
    assert zygote.capabilities_left(empty.replace("CapBnd:\t0000000000000000", "CapBnd:\t000001ffffffffff")) \
        == ["CapBnd"]
    assert zygote.capabilities_left("") == list(zygote.CAP_FIELDS)


LEAN_COMMAND_LINE = ["-f", "/run/kernel/c.json", *PythonKernel.LEAN_ARGS]


def test_command_line_settings_of_the_forms_the_server_writes() -> None:
    assert zygote.command_line_settings(["-f", "/run/kernel/c.json", "--HistoryManager.enabled=False"]) == [
        ("IPKernelApp", "connection_file", "/run/kernel/c.json"), ("HistoryManager", "enabled", "False")]
    assert zygote.command_line_settings([]) == []
    for other in (["-f"], ["--debug"], ["--IPKernelApp.quiet"], ["IPKernelApp.quiet=1"], ["--a.b.c=1"],
                  ["--.quiet=1"], ["-f", "a", "-f", "b"], ["--IPKernelApp.extensions=a", "--IPKernelApp.extensions=b"]):
        assert zygote.command_line_settings(other) is None, other


def _typed(config: dict) -> dict[tuple[str, str], tuple[type, str]]:
    return {(section, key): (type(value), str(value)) for section, values in config.items()
            for key, value in values.items()}


@pytest.mark.parametrize("argv", [LEAN_COMMAND_LINE, ["-f", "~/c.json", "--Session.key=abc", "--IPKernelApp.quiet=False",
                                                     "--Other.thing=1"]])
def test_a_forked_kernel_is_configured_as_traitlets_parser_would(argv: list[str]) -> None:
    parsed, configured = IPKernelApp(), IPKernelApp()
    parsed.parse_command_line(argv)
    config = zygote.cli_config(configured, argv)
    assert config is not None and _typed(config) == _typed(parsed.cli_config)  # the same values, the same types
    zygote.apply_cli_config(configured, argv, config)
    assert (configured.connection_file, configured.quiet) == (parsed.connection_file, parsed.quiet)
    assert configured.argv == parsed.argv == argv and configured.extra_args == parsed.extra_args == []


def test_a_container_setting_is_left_to_traitlets_parser() -> None:
    app = IPKernelApp()
    assert zygote.cli_config(app, [*LEAN_COMMAND_LINE, "--IPKernelApp.extensions=a"]) is None
    assert zygote.cli_config(app, ["--debug"]) is None
    assert zygote.cli_config(app, ["--HasTraits.x=1"]) is not None  # not a Configurable: a plain string


def test_the_prebuilt_shell_is_configured_as_the_lean_command_line() -> None:
    config = zygote.cli_config(IPKernelApp(), LEAN_COMMAND_LINE)
    assert zygote.shell_settings(config) == zygote.SHELL_CONFIG


SHELL_ADOPTION_PROBE = """
import json, os, sys, threading
ns = {{"__name__": "not_main"}}
exec(compile({source!r}, "<zygote>", "exec"), ns)
ns["preimport"]()
shell = ns["prebuild_shell"]()
assert shell is not None
assert threading.active_count() == 1, "a thread in the zygote would be lost in every fork"
assert shell.last_execution_result is None and shell.execution_count == 1 and shell.user_ns["_ih"] == [""]
os.environ["HOME"] = {home!r}  # the kernel's environment differs from the zygote's
from ipykernel.kernelapp import IPKernelApp
app, argv = IPKernelApp.instance(), {argv!r}
config = ns["cli_config"](app, argv)
if config is not None:  # as exec_kernel does
    app.parse_command_line = lambda argv=None: ns["apply_cli_config"](app, argv or [], config)
ns["adopt_shell_at_init"](app, shell)
app.initialize(argv)
ip = app.kernel.shell
ip.run_cell("x = 6 * 7")
sys.__stdout__.write(json.dumps({{"adopted": ip is shell, "kernel": ip.kernel is app.kernel, "parent": ip.parent is app.kernel,
    "config": ip.config is app.config, "profile": ip.profile_dir is app.profile_dir, "home": ip.home_dir,
    "pager": os.environ.get("PAGER"), "colors": ip.colors, "autocall": ip.autocall, "history": ip.history_manager.enabled,
    "x": ip.user_ns.get("x")}}))
app.close()
"""


def _adoption(tmp_path: Path, extra: list[str]) -> dict:
    home = tmp_path / "home"
    home.mkdir()
    argv = ["-f", str(tmp_path / "c.json"), *PythonKernel.LEAN_ARGS, *extra]
    probe = SHELL_ADOPTION_PROBE.format(source=sb.program_source("zygote"), home=str(home), argv=argv)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "HOME": str(tmp_path), "IPYTHONDIR": str(tmp_path / ".ipython")})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_lean_kernel_adopts_the_prebuilt_shell_wired_as_its_own(tmp_path: Path) -> None:
    seen = _adoption(tmp_path, [])
    assert seen == {"adopted": True, "kernel": True, "parent": True, "config": True, "profile": True,
                    "home": str(tmp_path / "home"), "pager": "cat", "colors": "nocolor", "autocall": 0, "history": False,
                    "x": 42}


def test_a_kernel_configured_otherwise_builds_its_own_shell(tmp_path: Path) -> None:
    seen = _adoption(tmp_path, ["--InteractiveShell.autocall=2"])
    assert seen["adopted"] is False and seen["autocall"] == 2 and seen["kernel"] and seen["x"] == 42


def test_the_prepared_app_is_prepared_for_the_servers_lean_command_line() -> None:
    from runflare_server.engine.jupyter.provisioner import CONNECTION_INSIDE

    assert ["-f", CONNECTION_INSIDE, *PythonKernel.LEAN_ARGS] == zygote.PREPARED_ARGV


PREPARED_APP_PROBE = """
import json, os, shutil, sys
ns = {{"__name__": "not_main"}}
exec(compile({source!r}, "<zygote>", "exec"), ns)
ns["WORK_DIR"] = {work!r}  # the kernel's /sandbox, here
env = {{"HOME": {work!r}, "IPYTHONDIR": {work!r} + "/.ipython", "PATH": os.environ["PATH"]}}
hook = sys.excepthook
prepared = ns["prepare_app"](env)
if prepared is None:
    sys.__stdout__.write(json.dumps(None))
    sys.exit(0)
launch = {{"argv": ["ipykernel_launcher", *ns["PREPARED_ARGV"]], "env": env}}
seen = {{"restored": sys.excepthook is hook and os.getcwd() == {cwd!r} and "IPYTHONDIR" not in os.environ,
        "fits": prepared.fits(launch),
        "other env": prepared.fits({{**launch, "env": {{**env, "X": "1"}}}}),
        "other argv": prepared.fits({{**launch, "argv": [*launch["argv"], "--IPKernelApp.log_level=10"]}})}}
tree = sorted((p, m) for p, m, _ in prepared.tree)
shutil.rmtree(env["IPYTHONDIR"])  # a kernel's fresh /sandbox
app = prepared.take()
seen["retaken"] = sorted((p, m) for p, m, _ in ns["profile_tree"](env["IPYTHONDIR"])) == tree
seen["app"] = app is prepared.app and sys.excepthook == app.excepthook and app.profile_dir.location == env["IPYTHONDIR"] + "/profile_default"
seen["files"] = [os.path.relpath(p, {work!r}) for p, _, content in prepared.tree if content is not None]
config = os.path.join(app.profile_dir.location, "ipython_kernel_config.py")
open(config, "w").write("c.InteractiveShell.autocall = 2")
seen["after a config file"] = prepared.fits(launch)
sys.__stdout__.write(json.dumps(seen))
"""


def _prepared(tmp_path: Path, system_config: str | None = None) -> dict | None:
    work = tmp_path / "sandbox"
    work.mkdir()
    if system_config is not None:  # an operator's config file, read by every kernel
        (work / ".ipython/profile_default").mkdir(parents=True)
        (work / ".ipython/profile_default/ipython_config.py").write_text(system_config)
    probe = PREPARED_APP_PROBE.format(source=sb.program_source("zygote"), work=str(work), cwd=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_prepared_app_fits_only_the_launch_it_was_prepared_for(tmp_path: Path) -> None:
    """``prepare_app`` runs the IPython part of the set-up in the kernel's environment and gives the zygote's
    back; a kernel takes the app only when launched exactly so and no config file has appeared since; it then
    gets the same profile tree, made again in its own (fresh) dir."""
    seen = _prepared(tmp_path)
    assert seen is not None
    assert seen.pop("files") == [".ipython/profile_default/startup/README"]
    assert seen == {"restored": True, "fits": True, "other env": False, "other argv": False, "retaken": True,
                    "app": True, "after a config file": False}


def test_no_app_is_prepared_when_a_config_file_is_read(tmp_path: Path) -> None:
    """A config file is code: what it did in the zygote would not be a kernel's. Each kernel then reads it."""
    assert _prepared(tmp_path, system_config="c.InteractiveShell.autocall = 2\n") is None


def test_check_raises_with_errno() -> None:
    with pytest.raises(OSError) as e:
        zygote.check(zygote.libc.rmdir(b"/nonexistent/dir"), "rmdir")
    assert e.value.errno == 2


# ------------------------------------------------------------------ bridge


def test_tcp_info_and_urls() -> None:
    ipc = {"transport": "ipc", "ip": "/run/kernel/k", "shell_port": 1, "iopub_port": 2, "stdin_port": 3,
           "control_port": 4, "hb_port": 5, "key": "s3cret", "signature_scheme": "hmac-sha256"}
    tcp = tcp_bridge.tcp_info(ipc)
    assert tcp["key"] == "s3cret" and tcp["transport"] == "tcp" and tcp["ip"] == "127.0.0.1"
    assert {tcp[f"{c}_port"] for c in tcp_bridge.TCP_PORTS} == set(tcp_bridge.TCP_PORTS.values())
    assert ipc["transport"] == "ipc"  # not changed
    assert tcp_bridge.url(ipc, "stdin") == "ipc:///run/kernel/k-3"
    assert tcp_bridge.url(tcp, "shell") == "tcp://127.0.0.1:45001"


def test_router_remembers_the_client_per_channel() -> None:
    r = tcp_bridge.Router()
    assert r.route("shell", "down", [b"reply"]) is None  # no client yet: dropped
    assert r.route("iopub", "down", [b"topic", b"msg"]) == [b"topic", b"msg"]
    assert r.route("iopub", "up", [b"\x01sub"]) == [b"\x01sub"]
    assert r.route("shell", "up", [b"client-a", b"req"]) == [b"req"]
    assert r.route("shell", "down", [b"rep"]) == [b"client-a", b"rep"]
    assert r.route("stdin", "down", [b"input_request"]) == [b"client-a", b"input_request"]  # the shell's client
    assert r.route("stdin", "up", [b"client-b", b"input_reply"]) == [b"input_reply"]
    assert r.route("stdin", "down", [b"x"]) == [b"client-b", b"x"]
    assert r.route("control", "down", [b"x"]) == [b"client-a", b"x"]


def test_bridge_relays_a_tcp_kernel_to_ipc_sockets(tmp_path: Path) -> None:
    """A real ipykernel speaking only TCP, in its own network namespace, reached through the bridge's ipc
    socket files; the bridge exits with the kernel's status."""
    if not shutil.which("bwrap"):
        skip_or_fail("bwrap is needed for a private network namespace")
    ipc = {"transport": "ipc", "ip": str(tmp_path / "k"), "shell_port": 1, "iopub_port": 2, "stdin_port": 3,
           "control_port": 4, "hb_port": 5, "key": "0123456789abcdef", "signature_scheme": "hmac-sha256"}
    (tmp_path / "c.json").write_text(json.dumps(ipc))
    tcp_file = str(tmp_path / "t.json")
    kernel = [sys.executable, "-m", "ipykernel_launcher", "-f", tcp_file, "--IPKernelApp.quiet=True"]
    cmd = ["bwrap", "--dev-bind", "/", "/", "--unshare-net", "--die-with-parent",
           *sb.bridged(kernel, str(tmp_path / "c.json"), tcp_file)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={k: v for k, v in os.environ.items() if k != "JPY_PARENT_PID"},
                            start_new_session=True)
    kc = BlockingKernelClient()
    outputs: list[dict] = []
    try:
        kc.load_connection_info(ipc)
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        assert json.loads(Path(tcp_file).read_text())["transport"] == "tcp"
        reply = kc.execute_interactive("import sys; print(6 * 7); sys.stdout.flush()", timeout=30,
                                       output_hook=outputs.append)
        assert reply["content"]["status"] == "ok"
        assert "42\n" in "".join(m["content"].get("text", "") for m in outputs if m["msg_type"] == "stream")
        kc.execute("import os; os._exit(3)")
        wait_until(lambda: proc.poll() is not None, message="the bridge exits with its kernel")
        assert proc.returncode == 3
    finally:
        kc.stop_channels()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()



def test_the_fork_server_imports_what_a_kernel_imports_at_start(tmp_path: Path) -> None:
    """A forked kernel imports nothing heavy at its start: the zygote's preimports cover what
    ``IPKernelApp.initialize`` pulls in (its debugger: debugpy, pdb, xmlrpc, http.server...)."""
    probe = f"""
import json, sys
ns = {{"__name__": "not_main"}}
exec(compile({sb.program_source("zygote")!r}, "<zygote>", "exec"), ns)
assert ns["preimport"]() == [], "a preimport is missing"
before = set(sys.modules)
from ipykernel.kernelapp import IPKernelApp
app = IPKernelApp.instance()
app.initialize(["-f", {str(tmp_path / "c.json")!r}, *{PythonKernel.LEAN_ARGS!r}])
new = sorted(set(sys.modules) - before)
sys.__stdout__.write(json.dumps(new))
app.close()
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    new = json.loads(out.stdout.strip().splitlines()[-1])
    heavy = ("debugpy", "pydevd", "IPython", "ipykernel", "pdb", "pydoc", "xmlrpc", "http", "psutil", "tornado")
    assert [m for m in new if m.split(".")[0] in heavy] == []
