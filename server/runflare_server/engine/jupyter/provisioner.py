"""``runflare-sandbox``: a jupyter_client kernel provisioner that starts any kernelspec inside the Run-Flare
sandbox, with limits.

A kernelspec opts in with::

    "metadata": {"kernel_provisioner": {"provisioner_name": "runflare-sandbox",
                                        "config": {"memory_limit": 1048576, "max_processes_and_or_threads": 128,
                                                   "max_file_size": 102400, "cpu_time_limit": 0}}}

and JupyterLab, Notebook 7, nbclient or a plain ``KernelManager`` then start that kernel sandboxed, with no
Run-Flare server running. The sandbox is the engine's own, built by the same functions as a kernel run's:
``kernel_sandbox.bwrap_argv`` (``policy.bwrap_command``: read-only system view with secrets masked, runc's
/proc lists, no /sys, its own PID/IPC/UTS/network namespaces, a private ``/sandbox`` tmpfs as cwd and HOME),
``policy.UidLease`` (a leased unprivileged host uid per kernel when started as root) and ``seccomp.bpf_fd``.

Lifecycle, modeled on jupyter_client's ``LocalProvisioner``:

- ``pre_launch`` makes the kernel's own dir (``scratch.private_dir``, so an engine's sweep removes what a
  killed server left), owned by the kernel's uid, mode 0700, and bound at ``/run/kernel`` in the sandbox. It
  switches the KernelManager to the ipc transport with its socket files in that dir (the kernel has its own
  network namespace, so TCP cannot reach it), writes the manager's connection file as usual and the
  kernel's own copy, ``/run/kernel/connection.json``, whose ``ip`` names the sockets by their path inside.
- ``launch_kernel`` starts bubblewrap with the seccomp filter's fd, in a fresh cgroup (v2 or v1) with the
  memory and process limits where the host allows one, else with rlimits (``RLIMIT_AS``, ``RLIMIT_NPROC``),
  and always ``RLIMIT_FSIZE``, ``RLIMIT_CORE`` 0 and, when set, ``RLIMIT_CPU``.
- ``send_signal`` signals the kernel's processes inside the sandbox (not bubblewrap), as LocalProvisioner
  signals the kernel's process group; ``kill`` kills the whole bubblewrap tree and the cgroup.
- ``cleanup`` removes the cgroup, the dir and gives the uid back (on a restart, the dir and uid are kept).

Kernels that speak only TCP (Deno) run behind the in-sandbox ipc<->tcp bridge. Chosen by configuration:

- ``fork_server``: the runtime dir of a shared ipykernel fork server (``fork_server.ForkServer.shared``).
  When the kernelspec is this interpreter's ipykernel, the server runs as root and the kernel has no
  network, the kernel is forked from it (its own namespaces, uid of the server's leased block, masked
  /proc, seccomp: see ``zygote``) instead of a bubblewrap of its own; its exit status is then exact.
- ``enable_network``: the kernel gets user-mode networking (pasta) in its own namespace, started by its
  leased uid through ``kernel_sandbox.network_argv`` (root only; never the host's network).
- ``base_dir``: where the kernel dirs are made (ipc socket paths are limited to 107 bytes), e.g. a kernel
  run engine's runtime dir; by default a swept scratch dir per kernel.

The weak sandbox modes (unshare, none) are not here: a kernelspec that asks for this provisioner is
started under bubblewrap (or forked from the fork server, itself under bubblewrap) or not at all.

This module knows nothing of HTTP, the store or the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from string import Template
from typing import Any

import psutil
import zmq
from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import Bool, Float, Int, List, Unicode

from runflare_server.engine.interface import Limits
from runflare_server.engine.jupyter.adapters import adapter_for
from runflare_server.engine.jupyter.fork_server import ForkServer
from runflare_server.engine.sandbox import cgroups, policy, scratch, seccomp
from runflare_server.engine.sandbox import kernel_sandbox as sb
from runflare_server.engine.sandbox.process import scratch_base

PROVISIONER_NAME = "runflare-sandbox"
CONNECTION_INSIDE = f"{sb.SANDBOX_CONN}/connection.json"
TCP_CONNECTION_INSIDE = f"{sb.SANDBOX_CONN}/connection-tcp.json"

# What ``runflare kernels install --sandboxed`` writes into a spec's provisioner config: an interactive
# kernel's limits (Judge0's per-run defaults would kill a notebook kernel within seconds).
DEFAULT_CONFIG: dict[str, Any] = {
    "memory_limit": 1_048_576,  # KB
    "max_processes_and_or_threads": 128,
    "max_file_size": 102_400,  # KB
    "cpu_time_limit": 0,  # seconds of CPU per process; 0: none
}


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot be applied here; the kernel is not started (never started unsandboxed)."""


def write_new(path: Path, text: str) -> None:
    """Write a new file of the server's, mode 0600; never through a link or over a file already there."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


class RunflareSandboxProvisioner(KernelProvisionerBase):
    """Starts a kernelspec's argv in the Run-Flare sandbox (bubblewrap, slot uid, seccomp, limits)."""

    memory_limit = Int(DEFAULT_CONFIG["memory_limit"], config=True,
                       help="memory of the kernel's whole tree in KB (cgroup; RLIMIT_AS per process without one); "
                            "0: no limit")
    max_processes_and_or_threads = Int(DEFAULT_CONFIG["max_processes_and_or_threads"], config=True,
                                       help="processes and threads of the kernel's tree (cgroup pids, else "
                                            "RLIMIT_NPROC of its uid); 0: no limit")
    max_file_size = Int(DEFAULT_CONFIG["max_file_size"], config=True,
                        help="largest file the kernel may write, in KB (RLIMIT_FSIZE); 0: no limit")
    cpu_time_limit = Float(DEFAULT_CONFIG["cpu_time_limit"], config=True,
                           help="CPU seconds per process (RLIMIT_CPU, rounded up); 0: no limit")
    stack_limit = Int(0, config=True, help="stack size in KB (RLIMIT_STACK); 0: the system's default")
    pass_env = List(Unicode(), ["JPY_SESSION_NAME"], config=True,
                    help="variables of the launch environment passed into the sandbox (besides the kernelspec's "
                         "own env and the sandbox's PATH, HOME and locale); nothing else of the server's "
                         "environment reaches the kernel")
    readonly_paths = List(Unicode(), [], config=True,
                          help="extra host trees the kernel may read (bound read-only)")
    base_dir = Unicode("", config=True,
                       help="dir in which the kernel's own dir is made (keep it short: ipc socket paths are "
                            "limited); empty: a swept scratch dir of its own below the engine's scratch base")
    enable_network = Bool(False, config=True,
                          help="user-mode networking (pasta) in the kernel's own network namespace, never the "
                               "host's; needs a root server (the kernel's leased uid runs pasta)")
    fork_server = Unicode("", config=True,
                          help="runtime dir of the shared ipykernel fork server to fork this kernel from when "
                               "it can be forked (this interpreter's ipykernel, root, no network); empty: never")

    process: subprocess.Popen | None = None
    pid: int | None = None
    kernel_dir: Path | None = None
    lease: policy.UidLease | None = None
    cgroup: cgroups.RunCgroup | None = None
    limit_mechanism: str = ""
    exit_reason: str | None = None  # "memory limit", ... once the kernel died of a limit
    returncode: int | None = None  # the sandbox's status once it is gone
    exact_status: bool = False  # returncode is the kernel's own (forked: -N for signal N), not bwrap's 128 + N
    forked: bool = False  # started from the fork server
    killed: bool = False  # SIGKILLed: no signal is sent after that (jupyter_client interrupts what it shuts down)

    # ------------------------------------------------------------------ state

    @property
    def has_process(self) -> bool:
        return self.process is not None

    def limits(self) -> Limits:
        """The configured limits in the engine's units (0 keeps a limit off)."""
        return Limits(cpu_time_limit=self.cpu_time_limit, cpu_extra_time=0.0, memory_limit=self.memory_limit,
                      stack_limit=self.stack_limit, max_processes_and_or_threads=self.max_processes_and_or_threads,
                      max_file_size=self.max_file_size)

    def rlimits(self, use_cgroup: bool) -> dict[int, tuple[int, int]]:
        """The rlimits bubblewrap (and so the kernel) starts with; limits set to 0 are left off."""
        values = cgroups.rlimit_values(self.limits(), use_cgroup)
        if self.cpu_time_limit <= 0:
            values.pop(resource.RLIMIT_CPU, None)
        if self.max_file_size <= 0:
            values.pop(resource.RLIMIT_FSIZE, None)
        if self.memory_limit <= 0:
            values.pop(resource.RLIMIT_AS, None)
        if self.max_processes_and_or_threads <= 0 or not policy.per_slot_uids():
            values.pop(resource.RLIMIT_NPROC, None)  # per uid: only a kernel's own leased uid may get it
        return values

    # ------------------------------------------------------------------ start

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Make the kernel's dir and uid, switch the manager to ipc sockets in that dir, write both
        connection files and build the bubblewrap command line."""
        km = self.parent
        if km is None:
            raise SandboxUnavailable(f"{PROVISIONER_NAME} needs a KernelManager as its parent")
        if not shutil.which("bwrap"):
            raise SandboxUnavailable("bubblewrap is not installed (apt-get install bubblewrap): "
                                     "a sandboxed kernelspec does not start without it")
        kwargs.pop("transport_encryption", None)  # the manager has already applied it to its own trait
        try:
            return self._prepare(km, kwargs)
        except BaseException:
            self._release()  # a kernel that does not start keeps no dir and no uid
            raise

    def _prepare(self, km: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if self.enable_network and not policy.per_slot_uids():
            raise SandboxUnavailable("enable_network needs a root server (the kernel's leased uid runs pasta)")
        if self.kernel_dir is None:  # a restart keeps the dir and the uid
            spec_argv = sb.resolve_argv(self.kernel_spec.argv if self.kernel_spec else [])
            self.forked = self._fork_server_for(spec_argv) is not None
            if self.forked:  # in the fork server's runtime dir; the server gives the kernel its uid
                Path(self.fork_server).mkdir(parents=True, exist_ok=True)
                self.kernel_dir = Path(self.fork_server) / f"k-{secrets.token_hex(6)}"
                self.kernel_dir.mkdir(mode=0o700)
            elif self.base_dir:
                self.kernel_dir = Path(self.base_dir) / f"k-{secrets.token_hex(6)}"
                self.kernel_dir.mkdir(mode=0o700)
            else:
                self.kernel_dir = scratch.private_dir("kernel", scratch_base())
            if policy.per_slot_uids() and not self.forked:
                self.lease = policy.UidLease.acquire()
        else:  # a restart: the last kernel could write its dir, so nothing there is trusted (a symlink would
            # turn the writes and chowns below into writes and chowns of host files): a fresh, empty dir
            shutil.rmtree(self.kernel_dir)
            self.kernel_dir.mkdir(mode=0o700)
        kdir = self.kernel_dir
        uid = self.lease.uid if self.lease else None

        km.transport = "ipc"
        km.ip = str(kdir / "k")
        if self._wants_curve(km) and km.curve_publickey is None:  # as LocalProvisioner; kept across restarts
            km.curve_publickey, km.curve_secretkey = zmq.curve_keypair()
        km.write_connection_file()
        self.connection_info = km.get_connection_info()
        inside = dict(self.connection_info, ip=f"{sb.SANDBOX_CONN}/k")
        if isinstance(inside.get("key"), bytes):
            inside["key"] = inside["key"].decode()
        inside["kernel_name"] = getattr(km, "kernel_name", "") or ""
        conn = kdir / "connection.json"
        write_new(conn, json.dumps(inside, indent=1))
        for path in (kdir, conn):
            if uid is not None:
                os.chown(path, uid, uid, follow_symlinks=False)
        os.chmod(kdir, 0o700)

        host_file = os.path.realpath(km.connection_file)
        cmd = sb.resolve_argv(km.format_kernel_cmd(extra_arguments=kwargs.pop("extra_arguments", [])))
        adapter = adapter_for(cmd, self.kernel_spec.language if self.kernel_spec else "")
        if adapter.tcp_only:  # Deno: TCP on the sandbox's own loopback, bridged to the ipc sockets
            cmd = sb.bridged([a.replace(host_file, TCP_CONNECTION_INSIDE) for a in cmd],
                             CONNECTION_INSIDE, TCP_CONNECTION_INSIDE)
        else:
            cmd = [a.replace(host_file, CONNECTION_INSIDE) for a in cmd]

        launch_env = dict(kwargs.pop("env", None) or os.environ)
        env = {k: launch_env[k] for k in self.pass_env if k in launch_env}
        spec_env = dict(self.kernel_spec.env or {}) if self.kernel_spec else {}
        env.update({k: Template(v).safe_substitute(launch_env) for k, v in spec_env.items()})
        env = adapter.launch_env(env)
        kwargs.pop("cwd", None)  # the kernel's cwd is its private /sandbox
        kwargs.pop("kernel_id", None)
        kwargs["sandbox_env"] = sb.clean_env(env, cmd[0])
        kwargs["cmd"] = cmd
        return kwargs

    def _fork_server_for(self, argv: list[str]) -> ForkServer | None:
        """The configured fork server, when it can start this kernel here (else the kernel gets a bwrap)."""
        if not self.fork_server or self.enable_network or not policy.per_slot_uids():
            return None
        if not adapter_for(argv, self.kernel_spec.language if self.kernel_spec else "").forkable:
            return None
        fs = ForkServer.shared(self.fork_server)
        return fs if fs.usable else None

    def _wants_curve(self, km: Any) -> bool:
        """Whether the manager's transport_encryption policy asks for CurveZMQ keys for this kernel."""
        wanted = str(getattr(km, "transport_encryption", "disabled")).lower()
        supported = "curve" in ((self.kernel_spec.metadata or {}).get("supported_encryption") or []
                                if self.kernel_spec else [])
        return wanted == "required" or (wanted == "auto" and supported)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Start bubblewrap around ``cmd`` in the kernel's cgroup, with its rlimits and seccomp filter."""
        assert self.kernel_dir is not None
        uid = self.lease.uid if self.lease else None
        resource_dir = self.kernel_spec.resource_dir if self.kernel_spec else None
        ro_extra = [p for p in [resource_dir, *self.readonly_paths] if p]
        self.exit_reason = None
        self.killed = False  # a restart: the kernel lives again
        self.returncode = None
        self.cgroup = None
        if self.memory_limit or self.max_processes_and_or_threads:
            self.cgroup = cgroups.RunCgroup.create(
                f"run-{os.getpid()}-k{(self.kernel_id or 'x')[:12]}",
                self.memory_limit or None, self.max_processes_and_or_threads or None)
        self.limit_mechanism = self.cgroup.kind if self.cgroup else "rlimit"
        if self.forked:
            return await self._fork(cmd, kwargs["sandbox_env"])
        filter_fd = seccomp.bpf_fd()
        try:
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
            if self.enable_network:
                assert uid is not None  # checked in pre_launch
                argv = sb.network_argv(cmd, self.kernel_dir, env=kwargs["sandbox_env"], ro_extra=ro_extra, uid=uid,
                                       seccomp_fd=filter_fd)
                env = policy.launcher_env()
            else:
                argv = sb.bwrap_argv(cmd, self.kernel_dir, network=False, env=kwargs["sandbox_env"],
                                     ro_extra=ro_extra, uid=uid, seccomp_fd=filter_fd)
            # spawned from the event loop's thread: bwrap's --die-with-parent follows the spawning thread
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=kwargs.get("stdout"), stderr=kwargs.get("stderr"),
                start_new_session=True, close_fds=True, pass_fds=(filter_fd,), env=env,
                preexec_fn=self._child_setup(self.cgroup))
        except BaseException:
            if self.cgroup is not None:
                self.cgroup.remove()
                self.cgroup = None
            self._release()
            raise
        finally:
            os.close(filter_fd)
        self.pid = self.process.pid
        self.log.debug("%s: kernel %s started as uid %s (pid %d, limits by %s)", PROVISIONER_NAME,
                       self.kernel_id, uid, self.pid, self.limit_mechanism)
        return self.connection_info

    async def _fork(self, cmd: list[str], env: dict[str, str]) -> KernelConnectionInfo:
        """Fork the kernel from the fork server (``cmd`` is ``python -m ipykernel_launcher ...``), then put
        its tree in the kernel's cgroup and set its rlimits."""
        assert self.kernel_dir is not None
        fs = ForkServer.shared(self.fork_server)
        write_new(self.kernel_dir / "launch.json", json.dumps({"env": env, "argv": ["ipykernel_launcher", *cmd[3:]]}))
        kid = self.kernel_dir.name.removeprefix("k-")
        try:
            self.process = await fs.fork(kid, self.kernel_dir)
            procs = self.processes()
            if self.cgroup is not None:
                for p in procs:
                    self.cgroup.add_pid(p.pid)
            sb.apply_rlimits(procs, self.rlimits(self.cgroup is not None), strict=True)
        except BaseException:
            if self.process is not None:
                await self.kill()
            if self.cgroup is not None:
                self.cgroup.remove()
                self.cgroup = None
            self._release()
            raise
        self.pid = self.process.pid
        self.log.debug("%s: kernel %s forked (pid %d, limits by %s)", PROVISIONER_NAME, self.kernel_id, self.pid,
                       self.limit_mechanism)
        return self.connection_info

    def _child_setup(self, cgroup: cgroups.RunCgroup | None) -> Callable[[], None]:
        """A ``preexec_fn``: join the kernel's cgroup, then set its rlimits (bwrap's, inherited inside)."""
        return cgroups.child_setup(self.rlimits(cgroup is not None), cgroup)

    # ------------------------------------------------------------------ running

    def processes(self) -> list[psutil.Process]:
        """The sandbox's whole process tree, bubblewrap included (empty once it is gone)."""
        return sb.tree(self.process.pid) if self.process is not None else []

    def kernel_processes(self) -> list[psutil.Process]:
        """The kernel's own processes: the tree below bubblewrap and its PID namespace's init."""
        procs = self.processes()
        if not procs:
            return []
        wrappers = {procs[0].pid}  # forked: the namespace's init, the fork server's child
        if not self.forked:
            below = sb.child_pids(procs[0].pid)
            with contextlib.suppress(psutil.Error):
                wrappers |= {p.pid for p in procs if p.pid in below and p.name() == "bwrap"}
        return [p for p in procs if p.pid not in wrappers]

    async def poll(self) -> int | None:
        if self.process is None:
            return 0
        ret = self.process.poll()
        if ret is not None:
            self._note_exit(ret)
        return ret

    def _note_exit(self, ret: int) -> None:
        if self.returncode is None:
            self.returncode = ret
            self.exact_status = bool(getattr(self.process, "exact_status", False))
        if self.exit_reason is None and self.cgroup is not None and self.cgroup.oom_killed():
            self.exit_reason = "memory limit"
            self.log.warning("%s: kernel %s was killed: it reached its memory limit (%d KB)", PROVISIONER_NAME,
                             self.kernel_id, self.memory_limit)
        elif self.exit_reason is None and ret != 0:
            self.exit_reason = f"exit status {ret}"

    def exit_status(self) -> tuple[int | None, int | None]:
        """``(exit code, signal)`` of the kernel once it is gone (``(None, None)`` while it runs). A forked
        kernel's status is its own; bubblewrap reports a kernel killed by signal N as 128 + N."""
        if self.returncode is None and self.process is not None:
            ret = self.process.poll()
            if ret is not None:
                self._note_exit(ret)
        rc = self.returncode
        if rc is None:
            return None, None
        if rc < 0:
            return None, -rc
        if rc > 128 and not self.exact_status:
            return None, rc - 128
        return rc, None

    async def wait(self) -> int | None:
        if self.process is None:
            return 0
        while await self.poll() is None:
            await asyncio.sleep(0.1)
        ret = self.process.wait()
        for name in ("stdout", "stderr", "stdin"):  # a forked kernel has none
            if f := getattr(self.process, name, None):
                f.close()
        self.process = None  # has_process is now False
        return ret

    async def send_signal(self, signum: int) -> None:
        """Signal the kernel's processes inside the sandbox (bubblewrap would not pass it on); SIGKILL
        kills the whole sandbox."""
        if self.process is None:
            return
        if signum == signal.SIGKILL:
            await self.kill()
            return
        if self.killed:  # nothing left to signal
            return
        for p in self.kernel_processes():
            with contextlib.suppress(psutil.Error):
                p.send_signal(signum)

    async def kill(self, restart: bool = False) -> None:
        """SIGKILL the whole bubblewrap tree and everything left in its cgroup."""
        if self.process is None:
            return
        self.killed = True
        proc = self.process
        await asyncio.get_running_loop().run_in_executor(None, sb.kill_tree, proc)
        if self.cgroup is not None:
            self.cgroup.kill_all(timeout=1.0)

    async def terminate(self, restart: bool = False) -> None:
        """SIGTERM to the kernel (it may clean up); the manager kills the sandbox if it lingers."""
        await self.send_signal(signal.SIGTERM)

    async def cleanup(self, restart: bool = False) -> None:
        """Kill what is left, remove the cgroup; unless restarting, remove the dir and give the uid back."""
        if self.process is not None and self.process.poll() is None:
            await self.kill(restart)
        if self.process is not None:
            self._note_exit(self.process.wait())
            for f in (getattr(self.process, "stdout", None), getattr(self.process, "stderr", None)):
                if f:
                    f.close()
        if self.cgroup is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.cgroup.remove)
            self.cgroup = None
        if not restart:
            self._release()

    def _release(self) -> None:
        """Remove the kernel's dir and give its uid back (only once nothing runs in the sandbox)."""
        if self.kernel_dir is not None:
            shutil.rmtree(self.kernel_dir, ignore_errors=True)
            self.kernel_dir = None
        if self.lease is not None:
            self.lease.release()  # nothing runs as its uid any more
            self.lease = None

    # ------------------------------------------------------------------ info

    def get_shutdown_wait_time(self, recommended: float = 5.0) -> float:
        return recommended

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        info.update({"pid": self.pid, "kernel_dir": str(self.kernel_dir) if self.kernel_dir else None,
                     "uid": self.lease.uid if self.lease else None, "limits": self.limit_mechanism})
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        await super().load_provisioner_info(provisioner_info)
        self.pid = provisioner_info.get("pid")

    def resolve_path(self, path: str) -> str | None:
        return None  # paths inside the sandbox are not the host's


def provisioner_metadata(config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``kernel_provisioner`` stanza of a sandboxed kernelspec's metadata."""
    return {"provisioner_name": PROVISIONER_NAME, "config": {**DEFAULT_CONFIG, **(config or {})}}


def sandboxed_kernelspec(name: str, config: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """The kernel.json of a sandboxed copy of the installed kernelspec ``name``, and its resource dir.

    The copy keeps the spec's argv, language, env and metadata, says "(sandboxed)" in its display name, and
    names this provisioner with ``DEFAULT_CONFIG`` overridden by ``config``. Raises KeyError when ``name``
    is not installed."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel as e:
        raise KeyError(name) from e
    data = spec.to_dict()
    metadata = dict(data.get("metadata") or {})
    metadata["kernel_provisioner"] = provisioner_metadata(config)
    display = re.sub(r"\s*\([^()]*kernel[^()]*\)$", "", spec.display_name)  # "Python 3 (ipykernel)" → "Python 3"
    data.update(display_name=f"{display} (sandboxed)", metadata=metadata)
    return data, spec.resource_dir


def install_sandboxed(name: str, *, new_name: str | None = None, prefix: str | None = None, user: bool = False,
                      config: dict[str, Any] | None = None) -> str:
    """Install ``NAME-sandboxed`` (or ``new_name``): a copy of kernelspec ``name`` (its logos and other
    resources too) started by this provisioner. Into ``PREFIX/share/jupyter/kernels`` (default
    ``sys.prefix``), or the user's Jupyter data dir with ``user``. Returns the installed spec's name."""
    from jupyter_client.kernelspec import KernelSpecManager

    if user and prefix:
        raise ValueError("user and prefix are exclusive")
    if not user and prefix is None:
        prefix = sys.prefix
    data, resource_dir = sandboxed_kernelspec(name, config)
    new_name = new_name or f"{name}-sandboxed"
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / new_name
        shutil.copytree(resource_dir, d, ignore=shutil.ignore_patterns("kernel.json", "__pycache__"))
        (d / "kernel.json").write_text(json.dumps(data, indent=1))
        KernelSpecManager().install_kernel_spec(str(d), new_name, user=user, prefix=prefix)
    return new_name
