"""The baseline of memory per idle WebSocket: a bare Tornado echo WebSocket server.

    python bench/echo_server.py PORT      (serves ws://127.0.0.1:PORT/ws, answers GET /health)
"""

from __future__ import annotations

import asyncio
import sys

from tornado import web, websocket


class Echo(websocket.WebSocketHandler):
    """Sends back whatever it receives; nothing else."""

    def on_message(self, message: str | bytes) -> None:
        self.write_message(message, binary=isinstance(message, bytes))


class Health(web.RequestHandler):
    def get(self) -> None:
        self.write("ok")


async def serve(port: int) -> None:
    web.Application([(r"/ws", Echo), (r"/health", Health)]).listen(port, "127.0.0.1")
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
