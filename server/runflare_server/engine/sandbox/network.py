"""A network that is safe to allow: user-mode networking in the sandbox's own network namespace.

``enable_network`` must never hand a submission the host's network namespace (its loopback, the
private ranges around it, 169.254.169.254). Instead the sandboxed process tree gets a NEW network
namespace whose only way out is ``pasta`` (Debian package ``passt``): pasta turns the namespace's
TCP/UDP/ICMP traffic into ordinary sockets of an unprivileged host process. Inside that namespace,
before the program starts, policy-routing rules make every address that is not "the internet" fail at
once with ``EACCES`` (a ``prohibit`` rule): the packet never leaves the sandbox's namespace, so pasta
never opens a socket towards it.

Usage (the caller is the slot's unprivileged uid, about to exec bwrap)::

    if network.available():                  # "pasta" or None, probed once
        argv = network.wrap(bwrap_argv)      # bwrap_argv contains --share-net
    # bwrap_argv should bind network.resolv_conf_path() onto /etc/resolv.conf (see resolv_conf_path).

What ``wrap`` returns, exec'd by the slot uid U (no capabilities, no supplementary groups)::

    pasta -q -f --config-net -t none -u none -T none -U none --no-map-gw --dns-forward 169.254.1.53 \\
        -- sh -c SETUP runflare-net RULES4 RULES6 bwrap ... --share-net ... -- program

1. pasta creates a user namespace L1 (U appears there as root) and a network namespace owned by L1,
   copies the host's address and default routes into it, and runs SETUP in it.
   ``-t/-u none``: no port of the namespace is exposed on the host. ``-T/-U none``: the namespace's
   loopback does NOT forward to the host's loopback (pasta's default would). ``--no-map-gw``: the
   gateway address is not translated to the host (pasta's default would).
2. SETUP (root in L1, so it holds CAP_NET_ADMIN over the new namespace) installs the rules with
   ``ip rule``: priority 10 lets UDP to the DNS forwarder through, priority 20 prohibits every blocked
   range (see ``BLOCKED_V4``/``BLOCKED_V6``) and every address of the host itself plus its gateways.
   Rules are consulted before any routing table except ``local``, so a more specific connected route
   (a host on 10.0.0.0/24 copied into the namespace) cannot win over them. Addresses local to the
   namespace (its loopback, its copy of the host's address) stay inside the namespace.
3. SETUP then execs ``unshare --user --map-user=U --map-group=G``: a user namespace L2 in which the
   program's uid is U again, not root, and the exec drops every capability. bwrap then runs exactly as
   without networking (its own user namespace, mapping U to itself); ``--share-net`` keeps it in the
   new network namespace. The network namespace is owned by L1 and nothing below L1 holds a
   capability there, so the program cannot change the rules (``ip rule del`` gives EPERM), open raw
   or packet sockets to get around routing, or reach pasta's tap device directly.

File descriptors pass through pasta, SETUP and unshare unchanged (bwrap's ``--seccomp FD``,
``--info-fd`` ...), and the exit status of bwrap is pasta's exit status. pasta exits when its child
does; bwrap's ``--die-with-parent`` ends the sandbox if pasta is killed. pasta itself runs as U in the
host's network namespace, inside the same cgroup/rlimits as the run.

Requirements: ``pasta`` (passt), ``ip`` (iproute2), ``unshare`` (util-linux), and ``/dev/net/tun``
openable by the slot uid (mode 0666, the udev default; see ``prepare_tun``).

slirp4netns is not used: it attaches to an existing namespace from outside, so it needs a parent
process orchestrating the namespace, the tool and a ready pipe, where pasta is a single exec that
fits the "argv exec'd by the slot uid" contract. ``available`` reports it as present but unused.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import shutil
import stat
import subprocess
import threading
from pathlib import Path

TOOL_PREFERENCE = ("pasta",)

# Address inside the sandbox that pasta forwards DNS (UDP port 53) for, to the host's resolver: the
# first IPv4 nameserver of the host's /etc/resolv.conf, as pasta reads it at start (a loopback resolver
# such as 127.0.0.53 works too; only UDP port 53 is forwarded). passt 2023-03 forwards UDP only, and
# its -D option does not change the forwarding target, so there is no override here.
# The address lies in a blocked range on purpose: only UDP to port 53 of it is let through.
DNS_FORWARD_V4 = "169.254.1.53"

RULE_PRIORITY_ALLOW = 10
RULE_PRIORITY_BLOCK = 20

BLOCKED_V4 = (
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8",  # RFC 1918
    "100.64.0.0/10",  # carrier-grade NAT
    "127.0.0.0/8",  # loopback (the namespace's own 127/8 stays local: the local table comes first)
    "169.254.0.0/16",  # link-local, incl. the metadata address 169.254.169.254
    "172.16.0.0/12",  # RFC 1918
    "192.0.0.0/24",  # IETF protocol assignments
    "192.168.0.0/16",  # RFC 1918
    "198.18.0.0/15",  # benchmarking, often used for internal networks
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, incl. 255.255.255.255
)
BLOCKED_V6 = (
    "::/128",  # unspecified
    "::/96",  # IPv4-compatible (deprecated)
    "::ffff:0:0/96",  # IPv4-mapped (the kernel routes these as IPv4 anyway)
    "fc00::/7",  # unique local
    "fe80::/10",  # link-local
    "fec0::/10",  # site-local (deprecated)
    "ff00::/8",  # multicast
)

PASTA_FLAGS = (
    "-q",  # no informational messages on the program's stderr
    "-f",  # foreground: pasta exits when the program does, with its status
    "--config-net",  # address and routes copied from the host's default interface
    "-t",
    "none",
    "-u",
    "none",  # no namespace port is bound on the host
    "-T",
    "none",
    "-U",
    "none",  # the namespace's loopback does not lead to the host's loopback
    "--no-map-gw",  # the gateway address is not mapped to the host
)

# Runs as root of pasta's user namespace, inside the new network namespace.
# $1: IPv4 rules for `ip -batch`, $2: IPv6 rules, then the command to run.
_SETUP = r"""set -e
printf '%s\n' "$1" | ip -4 -batch -
printf '%s\n' "$2" | ip -6 -batch -
shift 2
read -r _ u _ </proc/self/uid_map
read -r _ g _ </proc/self/gid_map
exec unshare --user --map-user="$u" --map-group="$g" -- "$@"
"""

PROBE_UID_ENV = "RUNFLARE_NET_PROBE_UID"
DEFAULT_PROBE_UID = 1899999999
_PROBE_TIMEOUT = 30

_lock = threading.Lock()
_probe: dict | None = None


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


# ---------------------------------------------------------------- the host's own addresses


def _local_v4() -> set[ipaddress.IPv4Address]:
    """Every IPv4 address of the host (the caller's network namespace), from /proc/net/fib_trie."""
    out: set[ipaddress.IPv4Address] = set()
    last = None
    try:
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        s = line.strip()
        if s.startswith("|-- "):
            last = s[4:]
        elif s == "/32 host LOCAL" and last:
            out.add(ipaddress.IPv4Address(last))
    return out


def _local_v6() -> set[ipaddress.IPv6Address]:
    out: set[ipaddress.IPv6Address] = set()
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            out.add(ipaddress.IPv6Address(int(line.split()[0], 16)))
    except (OSError, ValueError, IndexError):
        pass
    return out


def _gateways() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The host's gateways (pasta copies them into the namespace; block them as destinations)."""
    out: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    try:
        for line in Path("/proc/net/route").read_text().splitlines()[1:]:
            f = line.split()
            gw = int(f[2], 16)
            if gw:
                out.add(ipaddress.IPv4Address(gw.to_bytes(4, "little")))
    except (OSError, ValueError, IndexError):
        pass
    try:
        for line in Path("/proc/net/ipv6_route").read_text().splitlines():
            gw = int(line.split()[4], 16)
            if gw:
                out.add(ipaddress.IPv6Address(gw))
    except (OSError, ValueError, IndexError):
        pass
    return out


def blocked_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The fixed blocked ranges plus the host's own addresses and gateways not already covered."""
    nets = [ipaddress.ip_network(n) for n in BLOCKED_V4 + BLOCKED_V6]
    extra = sorted(_local_v4() | _local_v6() | _gateways(), key=lambda a: (a.version, int(a)))
    for addr in extra:
        if not any(addr.version == n.version and addr in n for n in nets):
            nets.append(ipaddress.ip_network(addr))
    return nets


def _rules() -> tuple[str, str]:
    v4 = [
        f"rule add priority {RULE_PRIORITY_ALLOW} to {DNS_FORWARD_V4}/32 ipproto udp dport 53 lookup main",
    ]
    v6: list[str] = []
    for net in blocked_networks():
        (v4 if net.version == 4 else v6).append(f"rule add priority {RULE_PRIORITY_BLOCK} to {net} prohibit")
    return "\n".join(v4), "\n".join(v6)


# ---------------------------------------------------------------- building the argv


def _wrap_any(cmd: list[str]) -> list[str]:
    rules4, rules6 = _rules()
    pasta = _which("pasta") or "pasta"
    return [
        pasta,
        *PASTA_FLAGS,
        "--dns-forward",
        DNS_FORWARD_V4,
        "--",
        "/bin/sh",
        "-c",
        _SETUP,
        "runflare-net",
        rules4,
        rules6,
        *cmd,
    ]


def wrap(cmd: list[str]) -> list[str]:
    """Return an argv that runs ``cmd`` (a bwrap argv with ``--share-net``) in a new network namespace
    reached only through pasta, with the blocked ranges prohibited inside it.

    Exec the result as the slot's unprivileged uid. The rules include the host's addresses and
    gateways as they are when ``wrap`` is called.
    """
    cmd = list(cmd)
    if "--share-net" not in cmd:
        raise ValueError("network.wrap: the bwrap argv must contain --share-net (it joins pasta's namespace)")
    return _wrap_any(cmd)


# ---------------------------------------------------------------- DNS inside the sandbox

RESOLV_CONF = f"nameserver {DNS_FORWARD_V4}\noptions timeout:2 attempts:2\n"


def resolv_conf_path(directory: str | os.PathLike | None = None) -> str:
    """A file with RESOLV_CONF, to bind read-only onto the sandbox's /etc/resolv.conf
    (``--ro-bind PATH /etc/resolv.conf`` after the mounts that provide /etc)."""
    d = (
        Path(directory)
        if directory
        else Path("/run/runflare-net" if os.geteuid() == 0 else "/tmp") / (f"runflare-net-{os.geteuid()}")
    )
    d.mkdir(mode=0o755, parents=True, exist_ok=True)
    st = d.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise RuntimeError(f"{d}: not a directory owned by uid {os.geteuid()} and writable only by it")
    path = d / "resolv.conf"
    try:
        current = path.read_text()
    except OSError:
        current = None
    if current != RESOLV_CONF:
        tmp = d / f".resolv.conf.{os.getpid()}"
        tmp.write_text(RESOLV_CONF)
        tmp.chmod(0o644)
        os.replace(tmp, path)
    return str(path)


# ---------------------------------------------------------------- /dev/net/tun


def tun_problem() -> str | None:
    """Why an unprivileged slot uid could not open /dev/net/tun, or None."""
    try:
        st = os.stat("/dev/net/tun")
    except OSError as e:
        return f"/dev/net/tun: {e.strerror} (load the tun module)"
    if not stat.S_ISCHR(st.st_mode):
        return "/dev/net/tun is not a character device"
    if st.st_mode & 0o006 != 0o006:
        return (
            f"/dev/net/tun has mode {stat.S_IMODE(st.st_mode):04o}: unprivileged slot uids cannot open it "
            "(make it 0666, the udev default, e.g. with network.prepare_tun() as root)"
        )
    return None


def prepare_tun() -> int | None:
    """As root: make /dev/net/tun 0666 (what udev does on a standard host; creating a tun device still
    needs CAP_NET_ADMIN in the namespace). Returns the previous mode if it was changed, else None. A
    probe made before the change is forgotten (it said pasta could not open the device)."""
    global _probe
    st = os.stat("/dev/net/tun")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o666 == 0o666:
        return None
    os.chmod("/dev/net/tun", mode | 0o666)
    with _lock:
        _probe = None
    return mode


# ---------------------------------------------------------------- probing


def _probe_uid() -> int:
    return int(os.environ.get(PROBE_UID_ENV) or DEFAULT_PROBE_UID)


# Inside the sandbox's namespace, as the unprivileged uid: the rules are there and cannot be removed.
_PROBE_CHECK = (
    "ip -4 rule list | grep -q 'to 169.254.0.0/16 prohibit' && "
    "ip -6 rule list | grep -q 'to fc00::/7 prohibit' && "
    f"! ip rule del priority {RULE_PRIORITY_BLOCK} 2>/dev/null && "
    '[ "$(ip -4 route show default)" ]'
)


def _run_probe(tool: str) -> str | None:
    """None if ``tool`` works here for an unprivileged uid, else the reason it does not."""
    missing = [n for n in ("pasta", "ip", "unshare", "setpriv") if not _which(n)]
    if missing:
        return "missing: " + ", ".join(missing) + " (Debian packages passt, iproute2, util-linux)"
    problem = tun_problem()
    if problem:
        return problem
    argv = _wrap_any(["/bin/sh", "-c", _PROBE_CHECK])
    if os.geteuid() == 0:
        uid = _probe_uid()
        argv = [_which("setpriv"), f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]
    try:
        r = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=_PROBE_TIMEOUT, cwd="/"
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{tool} probe failed: {e}"
    if r.returncode != 0:
        err = " ".join(line for line in r.stderr.splitlines() if "to syslog" not in line)[-400:]
        return f"{tool} probe exited with {r.returncode}: {err or 'rules missing or removable'}"
    return None


def available(refresh: bool = False) -> str | None:
    """The user-mode networking tool that works here ("pasta"), or None. Probed once (``refresh``
    probes again), by running the real wrapper as an unprivileged uid."""
    global _probe
    with _lock:
        if _probe is None or refresh:
            reasons: dict[str, str] = {}
            tool = None
            for name in TOOL_PREFERENCE:
                reason = _run_probe(name)
                if reason is None:
                    tool = name
                    break
                reasons[name] = reason
            _probe = {"tool": tool, "reasons": reasons}
        return _probe["tool"]


@functools.cache
def _version(name: str) -> str | None:
    path = _which(name)
    if not path:
        return None
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", {"pasta": "passt"}.get(name, name)],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    return out or "unknown"


def dns_upstream() -> str | None:
    """The resolver pasta forwards the sandbox's DNS to: the host's first IPv4 nameserver."""
    try:
        for line in Path("/etc/resolv.conf").read_text().splitlines():
            f = line.split()
            if len(f) >= 2 and f[0] == "nameserver":
                try:
                    return str(ipaddress.IPv4Address(f[1]))
                except ValueError:
                    continue
    except OSError:
        pass
    return None


def describe() -> dict:
    """For the health route: which tool, why not, and what the sandbox's network may reach."""
    tool = available()
    assert _probe is not None
    return {
        "tool": tool,
        "available": tool is not None,
        "reason": None if tool else "; ".join(f"{k}: {v}" for k, v in _probe["reasons"].items()) or None,
        "versions": {"pasta": _version("pasta"), "slirp4netns": _version("slirp4netns")},
        "flags": [*PASTA_FLAGS, "--dns-forward", DNS_FORWARD_V4],
        "dns": DNS_FORWARD_V4,
        "dns_upstream": dns_upstream(),
        "blocked": [str(n) for n in blocked_networks()],
        "blocked_errno": "EACCES",
    }
