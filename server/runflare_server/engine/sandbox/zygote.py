"""The ipykernel fork server ("zygote"): a program that runs INSIDE the sandbox, never imported by the server.

The server starts it as ``python -c <this file's text> WORK_BYTES POLICY_JSON`` (see
``kernel_sandbox.zygote_argv``), so nothing of the server's tree is bound into the sandbox: this module
imports only the standard library, ipykernel and its traitlets, and must stay that way (a test checks it).

bwrap (as root of a user namespace the server maps onto a leased block of unprivileged host uids, no
capabilities of the host) gives it the policy's system view. It imports ipykernel once and forks each
kernel: fresh mount/net/ipc/uts/pid namespaces, its own /proc with runc's read-only and masked paths, /tmp,
/sandbox and connection dir, the other kernels' dirs hidden, then the kernel's own uid from the block, an
empty bounding set, no_new_privs and the seccomp filter, and only then the kernel.

Protocol: "ready\\n" on stdout once ipykernel is imported. Commands on stdin, one per line:
``<kernel id> <uid in the namespace>``; answers on stdout: ``<kernel id> <pid in the zygote's namespace>``.
Each kernel's exact exit status (``-N`` for a signal) goes to ``/run/kernels/status-<kernel id>``.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import random
import signal
import sys
from typing import Any

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWPID = 0x20000, 0x4000000, 0x8000000, 0x40000000, 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
PR_SET_SECCOMP, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 22, 24, 38
SECCOMP_MODE_FILTER = 2
LINUX_CAPABILITY_VERSION_3 = 0x20080522
EINVAL = 22
CAP_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
RUNTIME_DIR = "/run/kernels"  # every kernel's connection dir (k-<id>) and status file (status-<id>)
KERNEL_DIR = "/run/kernel"  # the one connection dir a kernel sees
WORK_DIR = "/sandbox"
SETUP_FAILED = 70  # a forked child's status when the kernel's set-up raised

libc = ctypes.CDLL(None, use_errno=True)


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


# ------------------------------------------------------------------ pure parts (unit-tested on the host)

def parse_command(line: str) -> tuple[str, int]:
    """A fork command ``"<kernel id> <uid>"``; raises ValueError on anything else."""
    kid, uid = line.split()
    if not kid.isalnum():
        raise ValueError(f"bad kernel id {kid!r}")
    return kid, int(uid)


def exact_status(status: int) -> int:
    """A kernel's exact status from its ``waitpid`` status: its exit status, ``-N`` for signal N."""
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def exit_byte(code: int) -> int:
    """The init's own exit status for an exact status (a signal N folds into 128 + N)."""
    return code if 0 <= code < 256 else 128 + (-code % 128)


def command_line_settings(argv: list[str]) -> list[tuple[str, str, str]] | None:
    """``(class, trait, value)`` of a kernel command line made only of what the server writes, ``-f PATH``
    and ``--Class.trait=value`` each once; None for anything else (traitlets' own parser then reads it)."""
    settings, args = [], iter(argv)
    for arg in args:
        if arg == "-f":
            path = next(args, None)
            if path is None:
                return None
            settings.append(("IPKernelApp", "connection_file", os.path.expanduser(path)))
            continue
        key, eq, value = arg.removeprefix("--").partition("=")
        cls, dot, trait = key.partition(".")
        if not (arg.startswith("--") and eq and dot and cls.isidentifier() and trait.isidentifier()):
            return None
        settings.append((cls, trait, value))
    if len({(cls, trait) for cls, trait, _ in settings}) != len(settings):
        return None  # a repeated setting: a container trait's items, traitlets decides
    return settings


def capabilities_left(status: str) -> list[str]:
    """The capability sets of a ``/proc/self/status`` text that are not empty."""
    return [f for f in CAP_FIELDS if f"{f}:\t0000000000000000" not in status]


# ------------------------------------------------------------------ system calls

def check(result: int, what: str) -> None:
    """Raise OSError with errno when a libc call failed."""
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(src: str, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    check(libc.mount(src.encode(), dst.encode(), fstype.encode() if fstype else None, flags,
                     data.encode() if data else None), "mount " + dst)


def proc_view(readonly: list[str], masked: list[str]) -> None:
    """A fresh /proc with runc's read-only and masked paths."""
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for p in readonly:
        if os.path.exists(p):
            mount(p, p, None, MS_BIND | MS_REC)
            mount("none", p, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for p in masked:
        if os.path.isdir(p):
            mount("tmpfs", p, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k")
        elif os.path.exists(p):
            mount("/dev/null", p, None, MS_BIND)


def drop(uid: int, bpf: bytes) -> None:
    """Become ``uid`` with no capabilities in any set, no_new_privs and the seccomp filter; verified."""
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != EINVAL:  # EINVAL: no such cap
            check(-1, "drop capability %d from the bounding set" % cap)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)  # from uid 0 to another: permitted and effective capabilities go
    check(libc.capset(ctypes.byref(CapHeader(LINUX_CAPABILITY_VERSION_3, 0)), (CapData * 2)()),
          "capset")  # inheritable too
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    prog = SockFprog(len(bpf) // 8, bpf)
    check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0), "seccomp")
    with open("/proc/self/status") as f:
        left = capabilities_left(f.read())
    if left:
        raise OSError("capabilities left after the drop: " + left[0])


# ------------------------------------------------------------------ one kernel

def kernel(kid: str, uid: int, work_bytes: int, policy: dict[str, Any], prebuilt: Prebuilt | None = None) -> None:
    """In a forked child, PID 1 of its own pid namespace (``fork_kernel``): the other namespaces, then the
    kernel forked below this init, in its own view, as its uid."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setsid()
    # opened before the kernel hides /run/kernels: a file the kernel can neither see nor forge
    status_fd = os.open(f"{RUNTIME_DIR}/status-{kid}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
    child = os.fork()
    if child:  # the namespace's init, so the kernel's own signals act as they would anywhere; it records the
        # kernel's exact status (a SIGKILLed init records nothing: the host then reads -9)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # an interrupt is the kernel's (Python's handler would raise)
        while True:
            p, st = os.waitpid(-1, 0)
            if p == child:
                code = exact_status(st)
                os.write(status_fd, str(code).encode())
                os._exit(exit_byte(code))
    os.close(status_fd)
    view(kid, work_bytes, policy)
    drop(uid, bytes.fromhex(policy["bpf"]))
    exec_kernel(prebuilt)


def fork_kernel(kid: str, uid: int, work_bytes: int, policy: dict[str, Any], prebuilt: Prebuilt | None,
                own_pidns: int) -> int:
    """Fork the init of a new pid namespace, which starts the kernel (``kernel``); its pid here. The zygote's
    own children go back to the zygote's namespace at once: a later kernel never lands in this one."""
    check(libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
    try:
        pid = os.fork()
        if pid == 0:
            try:
                os.close(own_pidns)
                kernel(kid, uid, work_bytes, policy, prebuilt)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(SETUP_FAILED)
    finally:
        check(libc.setns(own_pidns, CLONE_NEWPID), "setns back to the zygote's pid namespace")
    if os.readlink("/proc/self/ns/pid_for_children") != os.readlink("/proc/self/ns/pid"):
        raise OSError("the zygote's children would not be in its own pid namespace")
    return pid


def view(kid: str, work_bytes: int, policy: dict[str, Any]) -> None:
    """The kernel's mount namespace: its /proc, /tmp, /sandbox, connection dir, /dev/shm; the rest read-only."""
    mount("none", "/", None, MS_REC | MS_PRIVATE)
    proc_view(policy["readonly"], policy["masked"])
    keep = [(p, os.open(p, os.O_PATH)) for p in policy["under_tmp"]]  # trees (a venv) below /tmp
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for p, fd in keep:
        os.makedirs(p, exist_ok=True)
        mount("/proc/self/fd/%d" % fd, p, None, MS_BIND | MS_REC)
        mount("none", p, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.close(fd)
    mount("tmpfs", WORK_DIR, "tmpfs", MS_NOSUID | MS_NODEV, "size=%d,mode=1777" % work_bytes)
    mount(f"{RUNTIME_DIR}/k-{kid}", KERNEL_DIR, None, MS_BIND)
    mount("tmpfs", RUNTIME_DIR, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k")
    mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "size=64m,mode=1777")
    # the zygote's / and /dev are shared with every kernel it forks: read-only in this kernel's namespace
    mount("none", "/dev", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)
    mount("none", "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def exec_kernel(prebuilt: Prebuilt | None = None) -> None:
    """Run ipykernel (already imported) with the kernel's own launch.json: argv, env, fds, cwd. ``prebuilt``:
    the zygote's shell, which the kernel adopts when its configuration is the one it was built for, and its
    prepared app, which the kernel takes when it is launched as the app was prepared for."""
    from ipykernel.kernelapp import IPKernelApp

    with open(f"{KERNEL_DIR}/launch.json") as f:
        launch = json.load(f)
    fd = os.open(f"{KERNEL_DIR}/kernel.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.closerange(3, 65536)
    os.chdir(WORK_DIR)
    os.environ.clear()
    os.environ.update(launch["env"])
    random.seed()
    # the kernel's I/O threads (shell, iopub) wait for the GIL at most this long while the main thread
    # runs Python code: a reply is out within ~0.5 ms, not up to CPython's 5 ms switch interval
    sys.setswitchinterval(0.0005)
    sys.argv = launch["argv"]
    argv = launch["argv"][1:]
    shell = prebuilt.shell if prebuilt else None
    prepared = prebuilt.app if prebuilt else None
    if prepared is not None and prepared.fits(launch):
        app = prepared.take()
        adopt_shell_at_init(app, shell)
        initialize_prepared(app, argv)
    else:
        IPKernelApp.clear_instance()  # not the prepared app: one of the kernel's own
        app = IPKernelApp.instance()
        parse_with_cli_config(app, argv)
        adopt_shell_at_init(app, shell)
        app.initialize(argv)
    app.start()
    os._exit(0)


def cli_config(app: Any, argv: list[str]) -> Any:
    """The config traitlets' parser makes of a command line of ``command_line_settings``'s forms: a value
    of a trait of the app's own classes parsed by that trait, any other a string parsed when it is
    configured. None for another command line or a container trait (whose command-line form differs)."""
    from traitlets import Container, Dict
    from traitlets.config import Configurable
    from traitlets.config.loader import Config, DeferredConfigString

    settings = command_line_settings(argv)
    if settings is None:
        return None
    known = {c.__name__: c for k in (type(app), *app.classes) for c in k.mro() if issubclass(c, Configurable)}
    config = Config()
    for cls, trait, value in settings:
        t = known[cls].class_traits(config=True).get(trait) if cls in known else None
        if isinstance(t, (Container, Dict)):
            return None
        config[cls][trait] = DeferredConfigString(value) if t is None else DeferredConfigString(value).get_value(t)
    return config


def parse_with_cli_config(app: Any, argv: list[str]) -> bool:
    """Have ``app`` parse ``argv`` with ``cli_config`` instead of traitlets' parser (about 4 ms of CPU a start);
    False, and the app left as it was, for a command line ``cli_config`` does not make."""
    config = cli_config(app, argv)
    if config is None:
        return False
    app.parse_command_line = lambda argv=None: apply_cli_config(app, argv or [], config)
    return True


def apply_cli_config(app: Any, argv: list[str], config: Any) -> None:
    """What ``Application.parse_command_line`` does once its parser has made ``config``."""
    app.argv = list(argv)
    app.cli_config = config
    app.update_config(config)
    app.extra_args = []


# ------------------------------------------------------------------ the prebuilt shell

# The shell settings of the server's lean kernel command line (``adapters.PythonKernel.LEAN_ARGS``, a test
# keeps them equal). The zygote builds that shell once; a forked kernel configured with exactly these shell
# settings adopts it instead of building its own (about 10 ms of a forked kernel's start CPU). Nothing of a
# submission is ever in it: the zygote runs no user code, and each kernel gets its own copy by the fork.
SHELL_CONFIG = {"HistoryManager": {"enabled": "False"}, "InteractiveShell": {"colors": "NoColor"}}


def shell_settings(config: Any) -> dict[str, dict[str, str]]:
    """What a config says of anything but the app itself (``IPKernelApp``), values as strings."""
    return {section: {key: str(value) for key, value in values.items()}
            for section, values in config.items() if section != "IPKernelApp" and values}


def prebuild_shell() -> Any:
    """The shell a kernel configured with ``SHELL_CONFIG`` builds (ipykernel's ``ZMQInteractiveShell``), made
    now; None when it cannot be (every kernel then builds its own)."""
    from ipykernel.compiler import XCachingCompiler
    from ipykernel.zmqshell import ZMQInteractiveShell
    from traitlets.config.loader import Config, DeferredConfigString

    config = Config({section: {key: DeferredConfigString(value) for key, value in values.items()}
                     for section, values in SHELL_CONFIG.items()})
    config.IPKernelApp.quiet = True  # (the shell writes a placeholder into a config without this section)
    try:
        shell = ZMQInteractiveShell.instance(config=config, compiler_class=XCachingCompiler)
        # a first cell's one-time costs (IPython's transformers and compiler), paid here once, not in each
        # kernel's warm-up; silent and out of history, it leaves no trace a kernel could see
        shell.run_cell("pass", store_history=False, silent=True)
        shell.last_execution_result = None
        return shell
    except Exception:  # noqa: BLE001 - a kernel builds its own shell as before
        import traceback

        traceback.print_exc()
        ZMQInteractiveShell.clear_instance()
        return None


def adopt_shell_at_init(app: Any, shell: Any) -> None:
    """Have ``app``'s kernel take ``shell`` (``prebuild_shell``'s) as its own when the app's config, read from
    its command line and config files, sets the shell exactly as ``SHELL_CONFIG``; else the kernel builds its
    own shell. The adopted shell is then wired as ``IPythonKernel`` wires the shell it builds."""
    from ipykernel.zmqshell import ZMQInteractiveShell
    from IPython.utils.path import get_home_dir

    init_kernel = app.init_kernel

    def init() -> None:
        if shell is None or shell_settings(app.config) != SHELL_CONFIG:
            ZMQInteractiveShell.clear_instance()
            init_kernel()
            return
        init_kernel()  # IPythonKernel takes the singleton: the prebuilt shell
        kernel = app.kernel
        if kernel.shell is not shell:
            raise RuntimeError("the kernel did not take the prebuilt shell")
        for section, values in shell.config.items():  # sections the shell's set-up added (e.g. its magics')
            app.config.setdefault(section, values)
        shell.config = app.config
        shell.parent = kernel
        shell.kernel = kernel
        shell.profile_dir = kernel.profile_dir
        shell.ipython_dir = app.ipython_dir
        shell.home_dir = get_home_dir()  # what the shell read of the zygote's environment, from the kernel's
        shell.init_environment()
        shell.init_virtualenv()

    app.init_kernel = init


# ------------------------------------------------------------------ the prepared app

# The command line the server gives a lean Python kernel (``adapters.PythonKernel.LEAN_ARGS`` after its
# connection file, at the one place it has in every kernel's view; a test keeps them equal).
PREPARED_ARGV = ["-f", f"{KERNEL_DIR}/connection.json", "--HistoryManager.enabled=False",
                 "--InteractiveShell.colors=NoColor", "--IPKernelApp.quiet=True"]


class PreparedApp:
    """An ``IPKernelApp`` whose IPython part (``BaseIPythonApplication.initialize``: its command line, crash
    handler, profile dir, config files) the zygote ran once, for a kernel launched with ``PREPARED_ARGV`` in
    ``env``, the environment the server gives a lean kernel, which is the zygote's own. A kernel launched
    exactly so takes it and does only what is its own (connection file, sockets, threads, kernel, shell):
    about 2.5 ms less CPU in each start here. The profile dir the preparation made (``tree``) is made again in each
    kernel's own /sandbox, as its uid: what IPython would make there."""

    def __init__(self, app: Any, env: dict[str, str], tree: list[tuple[str, int, bytes | None]],
                 excepthook: Any, config_files: list[str]) -> None:
        self.app = app
        self.env = env
        self.tree = tree  # (path, mode, content; None for a dir), parents first
        self.excepthook = excepthook  # the app's crash handler, restored in the zygote meanwhile
        self.config_files = config_files  # where a config file would be read: none was there

    def fits(self, launch: dict[str, Any]) -> bool:
        """Whether ``launch`` is the one the app was prepared for, and no config file has appeared since
        (a kernel started in full would read it)."""
        return (launch["argv"][1:] == PREPARED_ARGV and launch["env"] == self.env
                and not any(os.path.exists(p) for p in self.config_files))

    def take(self) -> Any:
        """In the kernel: its profile dir made, its crash handler set; the app, which starts no heartbeat (the
        server's pool client never pings one: no socket, ZMQ context or three threads made and killed for it;
        setting it up alone is 1.6 ms of CPU in an ipykernel started here without the fork server)."""
        for path, mode, content in self.tree:
            if content is None:
                os.makedirs(path, mode, exist_ok=True)
            else:
                with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode), "wb") as f:
                    f.write(content)
            os.chmod(path, mode)  # as made, whatever the umask
        sys.excepthook = self.excepthook
        self.app.init_heartbeat = lambda: None
        os.write(2, b"runflare: the kernel took the fork server's prepared app\n")  # its log says which start
        return self.app


def prepare_app(env: dict[str, str]) -> PreparedApp | None:
    """Run the IPython part of an ``IPKernelApp``'s set-up for ``PREPARED_ARGV`` in ``env``; None when it
    cannot be prepared here, or when a config file was read (its code ran in the zygote, and what it did there
    is not a kernel's): every kernel then sets up its own app."""
    from ipykernel.kernelapp import IPKernelApp
    from IPython.core.application import BaseIPythonApplication

    saved, hook, cwd = dict(os.environ), sys.excepthook, os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    os.environ.clear()
    os.environ.update(env)
    try:
        os.chdir(WORK_DIR)  # where a kernel starts
        app = IPKernelApp.instance()
        if not parse_with_cli_config(app, PREPARED_ARGV):
            raise ValueError(f"not a command line the zygote parses: {PREPARED_ARGV}")
        BaseIPythonApplication.initialize(app, list(PREPARED_ARGV))
        if app._loaded_config_files:
            IPKernelApp.clear_instance()
            return None
        names = [os.path.splitext(name)[0] + ext for name in ("ipython_config", *app.config_files) if name
                 for ext in (".py", ".json")]
        candidates = [os.path.join(d, n) for d in app.config_file_paths for n in names]
        return PreparedApp(app, dict(env), profile_tree(app.ipython_dir), sys.excepthook, candidates)
    except (Exception, SystemExit):  # noqa: BLE001 - a kernel sets up its own app as before
        import traceback

        traceback.print_exc()
        IPKernelApp.clear_instance()
        return None
    finally:
        os.environ.clear()
        os.environ.update(saved)
        sys.excepthook = hook
        os.fchdir(cwd)
        os.close(cwd)


def profile_tree(root: str) -> list[tuple[str, int, bytes | None]]:
    """Every dir and file below (and with) ``root``, parents first: ``(path, mode, content)``, None for a dir."""
    import stat

    tree: list[tuple[str, int, bytes | None]] = [(root, stat.S_IMODE(os.stat(root).st_mode), None)]
    for top, dirs, files in os.walk(root):
        dirs.sort()
        for name in dirs:
            path = os.path.join(top, name)
            tree.append((path, stat.S_IMODE(os.lstat(path).st_mode), None))
        for name in sorted(files):
            path = os.path.join(top, name)
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"not a plain file in the profile: {path}")
            with open(path, "rb") as f:
                tree.append((path, stat.S_IMODE(st.st_mode), f.read()))
    return tree


def initialize_prepared(app: Any, argv: list[str]) -> None:
    """``app.initialize(argv)`` less the IPython part the zygote ran for it (``prepare_app``)."""
    from IPython.core.application import BaseIPythonApplication

    base = BaseIPythonApplication.__dict__["initialize"]
    BaseIPythonApplication.initialize = lambda self, argv=None: None
    try:
        app.initialize(argv)
    finally:
        BaseIPythonApplication.initialize = base


class Prebuilt:
    """What the zygote builds once for every kernel it forks; either may be None (not built here)."""

    def __init__(self, shell: Any = None, app: PreparedApp | None = None) -> None:
        self.shell = shell
        self.app = app


# ------------------------------------------------------------------ the server loop

# What ``IPKernelApp.initialize`` imports on top of ipykernel itself (its debugger pulls in debugpy, pdb,
# xmlrpc, http.server...): imported once here, not in every forked kernel (about 110 ms of each start).
PREIMPORTS = ("ipykernel.ipkernel", "ipykernel.kernelapp", "ipykernel.zmqshell", "ipykernel.debugger",
              "IPython.core.completerlib", "IPython.core.debugger", "IPython.core.oinspect",
              "IPython.extensions.storemagic", "IPython.utils.wildcard", "pydoc", "faulthandler", "psutil",
              "resource", "tornado.platform.asyncio", "tornado.queues")


def preimport() -> list[str]:
    """Import what every kernel would import at its start; the names that could not be imported."""
    import importlib

    os.environ["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"  # debugpy's import-time warning (kernels get their own env)
    missing = []
    for name in PREIMPORTS:
        try:
            importlib.import_module(name)
        except ImportError:  # e.g. debugpy not installed: the kernel does without it too
            missing.append(name)
    return missing


def main(argv: list[str]) -> None:
    """``WORK_BYTES POLICY_JSON``: import ipykernel once, then fork a kernel per command on stdin."""
    work_bytes, policy = int(argv[0]), json.loads(argv[1])
    # as bubblewrap set it, the environment the server gives a lean kernel too (bubblewrap adds PWD)
    env = {k: v for k, v in os.environ.items() if k != "PWD"}
    import ipykernel.kernelapp  # noqa: F401 - the expensive part, once (fails loudly when ipykernel is missing)

    preimport()
    prebuilt = Prebuilt(prebuild_shell(), prepare_app(env))
    # what is imported stays out of the collector: a kernel's GC does not touch (and copy) the shared pages
    gc.freeze()

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the system
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY)
    for line in sys.stdin:
        kid, uid = parse_command(line)
        pid = fork_kernel(kid, uid, work_bytes, policy, prebuilt, own_pidns)
        sys.stdout.write("%s %d\n" % (kid, pid))
        sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
