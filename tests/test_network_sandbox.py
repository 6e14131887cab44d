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

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from runflare_server.engine import network  # noqa: E402

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
