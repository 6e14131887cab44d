"""The ipc<->tcp bridge: a program that runs INSIDE a kernel's sandbox, never imported by the server.

Some kernels speak only TCP (Deno). In the sandbox such a kernel listens on the sandbox's own loopback
(its own network namespace: nothing outside can reach it), and this bridge relays each channel to the ipc
socket files in the kernel's connection dir, which the server connects to.

The server starts it as ``python -c <this file's text> IPC_CONN TCP_CONN -- KERNEL_ARGV...`` (see
``kernel_sandbox.bridged``), so nothing of the server's tree is bound into the sandbox: this module
imports only the standard library and pyzmq, and must stay that way (a test checks it). It writes the
kernel's TCP connection file ``TCP_CONN`` (from ``IPC_CONN``, the server's), starts the kernel and exits
with the kernel's status once it is gone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

TCP_PORTS = {"shell": 45001, "iopub": 45002, "stdin": 45003, "control": 45004, "hb": 45005}
ROUTED_CHANNELS = ("shell", "stdin", "control", "hb")  # ROUTER (client side) <-> DEALER (kernel side)
POLL_MS = 200

Frames = list[bytes]


def tcp_info(ipc: dict[str, Any]) -> dict[str, Any]:
    """The kernel's own connection info: the server's, on fixed ports of the sandbox's loopback."""
    return dict(ipc, transport="tcp", ip="127.0.0.1", **{f"{ch}_port": port for ch, port in TCP_PORTS.items()})


def url(info: dict[str, Any], channel: str) -> str:
    """The ZMQ address of one channel of a connection info (ipc socket file or tcp port)."""
    if info["transport"] == "ipc":
        return "ipc://%s-%d" % (info["ip"], info[channel + "_port"])
    return "tcp://%s:%d" % (info["ip"], info[channel + "_port"])


class Router:
    """Where each message goes. Some kernels (Deno) answer only their direct peer and drop routing frames,
    so the bridge remembers the client's identity per channel (stdin goes to the shell's client)."""

    def __init__(self) -> None:
        self.client: dict[str, bytes] = {}

    def route(self, channel: str, way: str, frames: Frames) -> Frames | None:
        """The frames to send on for a message read on ``channel`` going ``way`` ("up": from the client to
        the kernel, "down": back); None when no client is known to send it to."""
        if channel == "iopub":
            return frames
        if way == "up":
            self.client[channel] = frames[0]
            return frames[1:]
        ident = self.client.get(channel) or self.client.get("shell")
        return None if ident is None else [ident, *frames]


def main(argv: list[str]) -> int:
    """``IPC_CONN TCP_CONN -- KERNEL_ARGV...``: relay until the kernel exits; returns its status."""
    import zmq

    with open(argv[0]) as f:
        ipc = json.load(f)
    tcp = tcp_info(ipc)
    with open(argv[1], "w") as f:
        json.dump(tcp, f)
    kernel = subprocess.Popen(argv[3:])
    ctx = zmq.Context()
    # nothing waits at the end: messages still queued for a kernel that is gone (heartbeats) are dropped,
    # or the context's term at exit would wait for them forever and the bridge outlive its kernel
    ctx.setsockopt(zmq.LINGER, 0)
    poller = zmq.Poller()
    pairs: dict[zmq.Socket, tuple[str, zmq.Socket, str]] = {}

    def pair(channel: str, front_type: int, back_type: int) -> None:
        front, back = ctx.socket(front_type), ctx.socket(back_type)
        front.bind(url(ipc, channel))
        back.connect(url(tcp, channel))
        pairs[front], pairs[back] = (channel, back, "up"), (channel, front, "down")
        poller.register(front, zmq.POLLIN)
        poller.register(back, zmq.POLLIN)

    for channel in ROUTED_CHANNELS:
        pair(channel, zmq.ROUTER, zmq.DEALER)
    pair("iopub", zmq.XPUB, zmq.XSUB)
    router = Router()
    while kernel.poll() is None:
        for sock, _ in poller.poll(POLL_MS):
            channel, other, way = pairs[sock]
            frames = router.route(channel, way, sock.recv_multipart())
            if frames is not None:
                other.send_multipart(frames)
    ctx.destroy(linger=0)
    return kernel.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
