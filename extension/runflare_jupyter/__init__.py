"""Run-Flare as a Jupyter Server extension: the REST and WebSocket API under {base_url}/runflare/api/v1/ and the
playground at {base_url}/runflare/, behind Jupyter Server's own authentication (docs/jupyter.md).

Enable with `jupyter server extension enable runflare_jupyter` (pip installs the enabling config file too).
"""

from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from .app import RunflareExtension

    return [{"module": "runflare_jupyter.app", "app": RunflareExtension}]
