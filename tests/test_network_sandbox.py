"""enable_network: user-mode networking (pasta) in the sandbox's own network namespace.

The test builds its own "internet": a network namespace on a documentation address (198.51.100.2)
with a TCP server and a tiny DNS server, and a "private" host (10.213.77.2) in a second namespace,
both joined to the host by veth pairs. The sandboxed program (an unprivileged uid, bwrap, as the real
sandbox runs it) must reach the first and nothing else: the host's loopback is refused, and private,
link-local and host addresses fail at once with EACCES from the prohibit rules inside the sandbox's
namespace (no packet leaves it). No traffic goes anywhere but loopback and the test's namespaces.

These tests never skip: a missing tool or privilege is a failure with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from runflare_server.engine.sandbox import network  # noqa: E402

SLOT_UID = 1900000099
INET_ADDR, INET_HOST_SIDE = "198.51.100.2", "198.51.100.1"
PRIV_ADDR, PRIV_HOST_SIDE = "10.213.77.2", "10.213.77.1"
DNS_NAME, DNS_ANSWER = "runflare-test.example", "198.51.100.77"
PORT = 8765
SANDBOX_PYTHON = "/usr/bin/python3"  # readable by the slot uid (the test runner's may live under /root)


def _need(*names: str) -> dict[str, str]:
    found = {n: shutil.which(n) or shutil.which(n, path="/usr/sbin:/usr/bin:/sbin:/bin") for n in names}
    missing = [n for n, p in found.items() if not p]
    if missing:
        pytest.fail(
            f"network sandbox tests need {', '.join(missing)} (Debian packages passt, iproute2, bubblewrap, "
            "util-linux; see .ci/apt-packages.txt)"
        )
    return found


def _sh(*argv: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


# A TCP server that sends a greeting, and (optionally) a DNS server answering one A record.
SERVER = r"""
import socket, sys, threading
addr, port, greeting, dns_name, dns_answer = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]

def dns():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind((addr, 53))
    while True:
        q, peer = u.recvfrom(512)
        try:
            u.sendto(answer(q), peer)
        except (IndexError, UnicodeDecodeError):
            pass

def answer(q):
    i, labels = 12, []
    while q[i]:
        labels.append(q[i + 1:i + 1 + q[i]].decode()); i += 1 + q[i]
    question = q[12:i + 5]
    qtype = int.from_bytes(q[i + 1:i + 3], "big")
    hit = ".".join(labels).lower() == dns_name and qtype == 1
    flags = b"\x81\x80" if hit else b"\x81\x83"
    head = q[:2] + flags + b"\x00\x01" + (b"\x00\x01" if hit else b"\x00\x00") + b"\x00\x00\x00\x00"
    ans = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + socket.inet_aton(dns_answer) if hit else b""
    return head + question + ans

if dns_name != "-":
    threading.Thread(target=dns, daemon=True).start()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port))
s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(greeting.encode())
    c.close()
"""


def remove_stale_test_hosts() -> None:
    """Test hosts a killed earlier run left behind (their servers still answer on the same addresses):
    kill what runs in each rf-test-* namespace and delete it (its veth pair goes with it)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for ns in [line.split()[0] for line in listing.splitlines() if line.startswith("rf-test-")]:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class NetnsHost:
    """A network namespace joined to the host by a veth pair, running SERVER."""

    def __init__(self, tag: str, addr: str, host_side: str, greeting: str, dns: bool) -> None:
        self.ns = f"rf-test-{tag}"
        self.veth = f"rf{tag}"[:15]
        self.addr, self.host_side, self.greeting = addr, host_side, greeting
        self.proc: subprocess.Popen | None = None
        _sh("ip", "netns", "add", self.ns)
        try:
            _sh("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.ns)
            _sh("ip", "addr", "add", f"{host_side}/24", "dev", self.veth)
            _sh("ip", "link", "set", self.veth, "up")
            _sh("ip", "-n", self.ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _sh("ip", "-n", self.ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", self.ns, "link", "set", "lo", "up")
            _sh("ip", "-n", self.ns, "route", "add", "default", "via", host_side)
            self.proc = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.ns,
                    sys.executable,
                    "-c",
                    SERVER,
                    addr,
                    str(PORT),
                    greeting,
                    DNS_NAME if dns else "-",
                    DNS_ANSWER,
                ],
                stdout=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                text=True,
            )
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()
            assert line.strip() == "ready", f"test server in {self.ns} did not start: {line!r}"
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)


class LoopbackServer:
    """A TCP server on an address of the host itself (127.0.0.1, or the host side of a veth)."""

    def __init__(self, addr: str, greeting: str) -> None:
        self.sock = socket.socket()
        self.sock.bind((addr, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.greeting = greeting
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            c.sendall(self.greeting.encode())
            c.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def env():
    tools = _need("pasta", "ip", "unshare", "bwrap", "setpriv")
    if os.geteuid() != 0:
        pytest.fail(
            "network sandbox tests must run as root (they create network namespaces and drop to a slot uid)"
        )
    old_tun_mode = network.prepare_tun()  # what a server allowing enable_network does at start
    remove_stale_test_hosts()
    tag = secrets.token_hex(3)
    hosts: list[NetnsHost] = []
    servers: list[LoopbackServer] = []
    try:
        assert network.available(refresh=True) == "pasta", network.describe()["reason"]
        inet = NetnsHost(f"i{tag}", INET_ADDR, INET_HOST_SIDE, f"internet-{tag}", dns=True)
        hosts.append(inet)
        priv = NetnsHost(f"p{tag}", PRIV_ADDR, PRIV_HOST_SIDE, f"private-{tag}", dns=False)
        hosts.append(priv)
        loop = LoopbackServer("127.0.0.1", f"loopback-{tag}")
        servers.append(loop)
        hostaddr = LoopbackServer(INET_HOST_SIDE, f"hostaddr-{tag}")
        servers.append(hostaddr)
        yield {"tools": tools, "tag": tag, "inet": inet, "priv": priv, "loop": loop, "hostaddr": hostaddr}
    finally:
        for s in servers:
            s.close()
        for h in hosts:
            h.remove()
        if old_tun_mode is not None:
            os.chmod("/dev/net/tun", old_tun_mode)
            network.available(refresh=True)


# The sandboxed program: tries each target and reports what happened, as JSON.
CODE = r"""
import errno, json, os, socket, subprocess, sys
targets = json.loads(sys.argv[1])
ip = sys.argv[2]
out = {"uid": os.getuid(), "connect": {}}
ifindex = next(i for i, n in socket.if_nameindex() if n != "lo")
for name, (host, port) in targets.items():
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    addr = (host, port) if fam == socket.AF_INET else (host.replace("%IF", ""), port, 0, ifindex if "%IF" in host else 0)
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(15)
    try:
        s.connect(addr)
        out["connect"][name] = "ok:" + s.recv(100).decode()
    except socket.timeout:
        out["connect"][name] = "timeout"
    except OSError as e:
        out["connect"][name] = errno.errorcode.get(e.errno, str(e.errno))
    finally:
        s.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.sendto(b"x", ("169.254.169.254", 53))
    out["udp_metadata"] = "sent"
except OSError as e:
    out["udp_metadata"] = errno.errorcode.get(e.errno, str(e.errno))
try:
    out["dns"] = socket.getaddrinfo(sys.argv[3], 80, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
except OSError as e:
    out["dns"] = "error: %s" % e
r = subprocess.run([ip, "rule", "del", "priority", "20", "to", "10.0.0.0/8"], capture_output=True, text=True)
out["rule_del"] = [r.returncode, r.stderr.strip()]
r = subprocess.run([ip, "route", "add", "unreachable", "203.0.113.0/24"], capture_output=True, text=True)
out["route_add"] = [r.returncode, r.stderr.strip()]
out["rules_after"] = subprocess.run([ip, "-4", "rule", "list"], capture_output=True, text=True).stdout
out["resolv"] = open("/etc/resolv.conf").read()
print(json.dumps(out))
"""


def _bwrap(env, resolv: str | None) -> list[str]:
    argv = [
        env["tools"]["bwrap"],
        "--unshare-all",
        "--share-net",
        "--die-with-parent",
        "--ro-bind",
        "/",
        "/",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
    ]
    if resolv:
        argv += ["--ro-bind", resolv, "/etc/resolv.conf"]
    return argv


def _run(env, argv: list[str], targets: dict, host_resolv: str | None = None) -> dict:
    program = ["--", SANDBOX_PYTHON, "-I", "-c", CODE, json.dumps(targets), env["tools"]["ip"], DNS_NAME]
    full = [
        env["tools"]["setpriv"],
        f"--reuid={SLOT_UID}",
        f"--regid={SLOT_UID}",
        "--clear-groups",
        *argv,
        *program,
    ]
    if host_resolv:
        # pasta forwards DNS to the first nameserver of the host's /etc/resolv.conf. Point that at the
        # test's DNS server for this run only (a private mount namespace; the host's file is untouched).
        full = [
            env["tools"]["unshare"],
            "--mount",
            "--propagation",
            "private",
            "--",
            "/bin/sh",
            "-c",
            'mount --bind "$0" /etc/resolv.conf && exec "$@"',
            host_resolv,
            *full,
        ]
    r = subprocess.run(full, capture_output=True, text=True, timeout=120, cwd="/", stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"sandboxed program failed ({r.returncode}):\n{r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def _targets(env) -> dict:
    return {
        "internet": [INET_ADDR, PORT],
        "host_loopback": ["127.0.0.1", env["loop"].port],
        "host_loopback6": ["::1", env["loop"].port],
        "host_address": [INET_HOST_SIDE, env["hostaddr"].port],
        "private_host": [PRIV_ADDR, PORT],
        "private_host_mapped6": ["::ffff:" + PRIV_ADDR, PORT],
        "metadata": ["169.254.169.254", 80],
        "rfc1918": ["192.168.1.1", 80],
        "ula6": ["fd12:3456::1", 80],
        "linklocal6": ["fe80::1%IF", 80],
    }


@pytest.fixture(scope="module")
def wrapped(env, tmp_path_factory):
    """One run of the program under network.wrap, shared by the assertions below."""
    resolv = network.resolv_conf_path()
    host_resolv = tmp_path_factory.mktemp("net") / "host-resolv.conf"
    host_resolv.write_text(f"nameserver {INET_ADDR}\n")
    host_resolv.chmod(0o644)
    argv = network.wrap(_bwrap(env, resolv))
    before = (env["loop"].accepted, env["hostaddr"].accepted)
    result = _run(env, argv, _targets(env), host_resolv=str(host_resolv))
    result["host_accepts"] = (env["loop"].accepted - before[0], env["hostaddr"].accepted - before[1])
    return result


def test_controls_show_the_targets_are_really_there(env):
    # The private host and the host's loopback are reachable when nothing blocks them, so the
    # failures below come from the sandbox's namespace, not from a missing server.
    with socket.create_connection((PRIV_ADDR, PORT), timeout=10) as s:
        assert s.recv(100).decode() == f"private-{env['tag']}"
    plain = _run(env, _bwrap(env, None), {"host_loopback": ["127.0.0.1", env["loop"].port]})
    assert plain["connect"]["host_loopback"] == f"ok:loopback-{env['tag']}"  # --share-net alone: host's lo


def test_program_runs_as_the_slot_uid(wrapped):
    assert wrapped["uid"] == SLOT_UID


def test_reaches_the_internet_host(wrapped, env):
    assert wrapped["connect"]["internet"] == f"ok:internet-{env['tag']}"


def test_host_loopback_is_not_reachable(wrapped):
    # 127.0.0.1 and ::1 are the sandbox namespace's own loopback, where nothing listens.
    assert wrapped["connect"]["host_loopback"] == "ECONNREFUSED"
    assert wrapped["connect"]["host_loopback6"] == "ECONNREFUSED"
    assert wrapped["host_accepts"][0] == 0


def test_host_own_address_is_prohibited(wrapped):
    assert wrapped["connect"]["host_address"] == "EACCES"
    assert wrapped["host_accepts"][1] == 0


def test_private_host_is_prohibited(wrapped):
    assert wrapped["connect"]["private_host"] == "EACCES"
    assert wrapped["connect"]["private_host_mapped6"] == "EACCES"


@pytest.mark.parametrize("name", ["metadata", "rfc1918", "ula6", "linklocal6"])
def test_internal_ranges_fail_at_once_with_eacces(wrapped, name):
    assert wrapped["connect"][name] == "EACCES"


def test_udp_to_metadata_is_prohibited(wrapped):
    assert wrapped["udp_metadata"] == "EACCES"


def test_dns_goes_through_the_forwarder(wrapped):
    assert wrapped["resolv"] == network.RESOLV_CONF
    assert wrapped["dns"] == DNS_ANSWER


def test_program_cannot_change_the_rules(wrapped):
    code, err = wrapped["rule_del"]
    assert code != 0 and "Operation not permitted" in err, wrapped["rule_del"]
    code, err = wrapped["route_add"]
    assert code != 0 and "Operation not permitted" in err, wrapped["route_add"]
    assert "to 10.0.0.0/8 prohibit" in wrapped["rules_after"]
    assert "to 169.254.0.0/16 prohibit" in wrapped["rules_after"]


def test_wrap_requires_share_net():
    with pytest.raises(ValueError):
        network.wrap(["bwrap", "--unshare-all", "--", "true"])


def test_describe(env):
    d = network.describe()
    assert d["tool"] == "pasta" and d["available"] and d["reason"] is None
    for net in ("10.0.0.0/8", "169.254.0.0/16", "127.0.0.0/8", "fc00::/7", f"{INET_HOST_SIDE}/32"):
        assert net in d["blocked"]
    assert "--no-map-gw" in d["flags"] and "-T" in d["flags"]


# ---------------------------------------------------------------- end to end: the real run paths
#
# The same probe goes through each real path that honours enable_network: a program run (Runner, as the
# program-run kernel runs it), a kernel run (KernelRuns: userns_launcher --become, pasta, bwrap), and a
# submission to a whole server. Each run prints, per target, "ok:<greeting>" or the errno name, and its
# uid as it sees it. Its host uid is read from outside: the probe runs `sleep MARKER` (a unique
# duration), and HostUid finds that process in the host's /proc and reads its real and effective uid.

E2E_PY = r"""
import errno, os, socket, subprocess
print("uid", os.getuid())
subprocess.run(["/usr/bin/sleep", MARKER])
for name, host, port in TARGETS:
    s = socket.socket()
    s.settimeout(10)
    try:
        s.connect((host, port))
        print(name, "ok:" + s.recv(100).decode())
    except socket.timeout:
        print(name, "timeout")
    except OSError as e:
        print(name, errno.errorcode.get(e.errno, str(e.errno)))
    finally:
        s.close()
"""

E2E_C = r"""
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *name_of(int e) {
    switch (e) {
    case EACCES: return "EACCES";
    case ECONNREFUSED: return "ECONNREFUSED";
    case ENETUNREACH: return "ENETUNREACH";
    case EHOSTUNREACH: return "EHOSTUNREACH";
    case EINPROGRESS: return "timeout";
    case ETIMEDOUT: return "ETIMEDOUT";
    default: return strerror(e);
    }
}

static void probe(const char *name, const char *ip, int port) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    struct timeval tv = {10, 0};
    char buf[101];
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    inet_pton(AF_INET, ip, &a.sin_addr);
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(s, (struct sockaddr *)&a, sizeof a) == 0) {
        ssize_t n = recv(s, buf, 100, 0);
        buf[n > 0 ? n : 0] = 0;
        printf("%s ok:%s\n", name, buf);
    } else {
        printf("%s %s\n", name, name_of(errno));
    }
    close(s);
}

int main(void) {
    printf("uid %d\n", (int)getuid());
    fflush(stdout);
    if (fork() == 0) {
        execl("/usr/bin/sleep", "/usr/bin/sleep", "%MARKER%", (char *)0);
        _exit(127);
    }
    wait(NULL);
%PROBES%
    return 0;
}
"""


class HostUid:
    """Watches the host's /proc for the probe's `/usr/bin/sleep MARKER` and records its (real, effective) uid."""

    def __init__(self) -> None:
        self.marker = f"1.5{secrets.randbelow(10**8):08d}"
        self.seen: set[tuple[int, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        want = b"/usr/bin/sleep\0" + self.marker.encode() + b"\0"
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    if Path(f"/proc/{pid}/cmdline").read_bytes() != want:
                        continue
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("Uid:"):
                            real, effective = line.split()[1:3]
                            self.seen.add((int(real), int(effective)))
                except OSError:
                    continue
            self._stop.wait(0.02)

    def __enter__(self) -> HostUid:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def uid(self) -> int:
        """The one host uid the probe ran as: a slot uid, never 0."""
        from runflare_server.engine.sandbox import policy

        assert len(self.seen) == 1, f"the probe's process was seen with host uids {self.seen}"
        ((real, effective),) = self.seen
        assert real == effective and real != 0 and real in policy.UidRange.from_env(), self.seen
        return real


def _e2e_targets(env) -> list[tuple[str, str, int]]:
    return [
        ("internet", INET_ADDR, PORT),
        ("private", PRIV_ADDR, PORT),
        ("loopback", "127.0.0.1", env["loop"].port),
    ]


def _source(env, language_id: int, marker: str) -> str:
    targets = _e2e_targets(env)
    if language_id == 50:
        probes = "\n".join(f'    probe("{n}", "{h}", {p});' for n, h, p in targets)
        return E2E_C.replace("%PROBES%", probes).replace("%MARKER%", marker)
    return f"TARGETS = {targets!r}\nMARKER = {marker!r}\n" + E2E_PY


def _parse(stdout: str) -> dict[str, str]:
    out = {}
    for line in stdout.splitlines():
        name, _, value = line.partition(" ")
        out[name] = value
    return out


def _check_network(env, seen: dict[str, str], loop_accepts: int) -> None:
    assert seen.get("internet") == f"ok:internet-{env['tag']}", seen  # the test's "internet" host answers
    assert seen.get("private") == "EACCES", seen  # prohibited inside the sandbox's namespace
    assert seen.get("loopback") == "ECONNREFUSED", seen  # the sandbox's own loopback: nothing listens
    assert loop_accepts == 0  # the host's 127.0.0.1 server never saw a connection


def _check_no_network(
    seen: dict[str, str], loop_accepts: int, loopback: tuple[str, ...] = ("ECONNREFUSED",)
) -> None:
    assert seen.get("internet") == "ENETUNREACH", seen
    assert seen.get("private") == "ENETUNREACH", seen
    assert seen.get("loopback") in loopback, seen
    assert loop_accepts == 0


@pytest.fixture(scope="module")
def runner(env):
    from runflare_server.engine.runs import languages as langs
    from runflare_server.engine.sandbox import policy
    from runflare_server.kernels.runner import Runner

    for lang_id in (50, 71):
        if not langs.available(langs.BY_ID[lang_id]):
            pytest.fail(f"language {lang_id} ({langs.BY_ID[lang_id].name}) is not installed here")
    r = Runner("bwrap")
    assert policy.per_slot_uids() and r.uid is not None
    yield r
    r.lease.release()


def _program_run(env, runner, language_id: int, network: bool) -> tuple[dict[str, str], int, int]:
    from runflare_server.engine.interface import Limits

    before = env["loop"].accepted
    with HostUid() as host:
        result = runner.run(
            language_id, _source(env, language_id, host.marker), limits=Limits(enable_network=network)
        )
    assert result.outcome == "exited" and result.exit_code == 0, result
    return _parse(result.stdout.decode()), env["loop"].accepted - before, host.uid()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("language_id", [71, 50])
def test_program_run_with_enable_network(env, runner, language_id):
    seen, accepts, host_uid = _program_run(env, runner, language_id, network=True)
    _check_network(env, seen, accepts)
    assert host_uid == runner.uid
    assert seen["uid"] == str(runner.uid)  # its own user namespaces map the slot uid to itself


@pytest.mark.timeout(180)
@pytest.mark.parametrize("language_id", [71, 50])
def test_program_run_without_enable_network_has_no_network(env, runner, language_id):
    seen, accepts, host_uid = _program_run(env, runner, language_id, network=False)
    _check_no_network(seen, accepts)
    assert host_uid == runner.uid and seen["uid"] == str(runner.uid)


class KernelEngine:
    """A started KernelRuns on its own event loop (kernels are spawned from this thread)."""

    def __init__(self) -> None:
        import asyncio

        from runflare_server.engine.runs.kernel_runs import KernelRuns

        self.loop = asyncio.new_event_loop()
        self.engine = KernelRuns(pool_sizes={"python3": 0})  # its own runtime dir
        self.loop.run_until_complete(self.engine.start())

    def run(self, code: str, network: bool):
        from runflare_server.engine.interface import Limits, RunRequest

        request = RunRequest(
            token=secrets.token_hex(8),
            source_code=code,
            language_id=1071,
            limits=Limits(enable_network=network),
        )
        return self.loop.run_until_complete(self.engine.run(request, lambda event: None))

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.stop())
        self.loop.close()


@pytest.fixture(scope="module")
def kernels(env, tmp_path_factory):
    from runflare_server.engine.jupyter.kernel_pool import installed_kernelspecs
    from runflare_server.engine.runs.kernel_runs import install_kernelspecs

    with pytest.MonkeyPatch.context() as mp:  # undone however the module ends
        if "python3" not in installed_kernelspecs():  # into a temp prefix, never this interpreter's
            prefix = tmp_path_factory.mktemp("kernelspecs")
            install_kernelspecs(prefix=str(prefix))
            mp.setenv("JUPYTER_PATH", os.pathsep.join(
                filter(None, [str(prefix / "share" / "jupyter"), os.environ.get("JUPYTER_PATH")])))
        k = KernelEngine()
        try:
            yield k
        finally:
            k.close()


def _kernel_run(env, kernels, network: bool) -> tuple[dict[str, str], int, int]:
    before = env["loop"].accepted
    with HostUid() as host:
        result = kernels.run(_source(env, 1071, host.marker), network)
    assert result.outcome == "exited" and result.exit_code == 0, result
    return _parse(result.stdout), env["loop"].accepted - before, host.uid()


@pytest.mark.timeout(180)
def test_kernel_run_with_enable_network(env, kernels):
    seen, accepts, host_uid = _kernel_run(env, kernels, network=True)
    _check_network(env, seen, accepts)
    assert seen["uid"] == str(host_uid)  # started fresh: its own user namespaces map the slot uid to itself


@pytest.mark.timeout(180)
def test_kernel_run_without_enable_network_has_no_network(env, kernels):
    seen, accepts, _ = _kernel_run(env, kernels, network=False)
    # A kernel forked by the fork server gets a network namespace whose loopback is down too.
    _check_no_network(seen, accepts, loopback=("ECONNREFUSED", "ENETUNREACH"))
    assert seen["uid"] != "0"


@pytest.mark.timeout(300)
def test_server_submission_with_enable_network(env, tmp_path_factory, live_server):
    from conftest import start_server
    from http_client import post

    server = start_server(
        tmp_path_factory.mktemp("net-server"), env={"RUNFLARE_ALLOW_ENABLE_NETWORK": "true"}
    )
    try:
        for language_id in (71, 1071):  # a program run and a kernel run, through the whole server
            before = env["loop"].accepted
            with HostUid() as host:
                body = {
                    "source_code": _source(env, language_id, host.marker),
                    "language_id": language_id,
                    "enable_network": True,
                }
                r = post(f"{server.api}/submissions?wait=true", body, timeout=120)
            assert r.status == 201, r.body
            assert r.json["status"]["description"] == "Accepted", r.json
            seen = _parse(r.json["stdout"])
            _check_network(env, seen, env["loop"].accepted - before)
            assert seen["uid"] == str(host.uid())
    finally:
        server.stop()
    # The same submissions on a server that does not allow enable_network (the default) are refused.
    for language_id in (71, 1071):
        body = {
            "source_code": _source(env, language_id, "0"),
            "language_id": language_id,
            "enable_network": True,
        }
        r = post(f"{live_server.api}/submissions?wait=true", body)
        assert r.status == 422, r.body
        assert r.json == {"enable_network": ["enabling network is not allowed"]}
