"""The extension app: one Run-Flare Service on Jupyter Server's IOLoop, its route table under {base_url}/runflare,
each handler behind Jupyter Server's authentication and authorization.

Nothing of Run-Flare is copied: the handlers are Run-Flare's own (api.ROUTES), subclassed with a gate in front
and JupyterHandler behind, so the identity provider (the server's token, a password cookie, JupyterHub's OAuth)
decides who is let in, exactly as for /api/kernels.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from typing import Any
from urllib.parse import quote, urlparse

from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.extension.application import ExtensionApp
from jupyter_server.utils import url_path_join
from tornado import web, websocket
from traitlets import Bool, Dict, Unicode

from runflare_server.api import ROUTES, HomeHandler
from runflare_server.api.access_log import scrub_uri
from runflare_server.api.base import BaseHandler
from runflare_server.config import Settings
from runflare_server.service import Service

PREFIX = "/runflare"
URL_ENV = "RUNFLARE_URL"  # what runflare_nb reads (runflare_nb/_protocol.py)
TOKEN_ENV = "RUNFLARE_AUTH_TOKEN"
READ_METHODS = {"GET", "HEAD", "OPTIONS"}


class JupyterGate:
    """In front of a Run-Flare handler (with JupyterHandler behind it in the MRO): wait for the service,
    authenticate with Jupyter Server's identity provider, authorize with its authorizer (resource "kernels":
    "read" for GET, "execute" otherwise), then run Run-Flare's own prepare."""

    api = True  # API routes answer 403 when unauthenticated; pages redirect to the login page
    runflare_prepare: Any = None

    @property
    def token(self) -> str | None:
        """JupyterHandler.token (the server's token, read while authenticating), until a Run-Flare handler
        sets its own `token` (the submission's, SubmissionSocket.get: after authentication)."""
        if "_runflare_token" in self.__dict__:
            return self.__dict__["_runflare_token"]
        return JupyterHandler.token.fget(self)  # type: ignore[attr-defined]

    @token.setter
    def token(self, value: str) -> None:
        self.__dict__["_runflare_token"] = value

    def _token_from_runflare_header(self) -> None:
        """runflare_nb sends its token as X-Auth-Token (header, or query on browser WebSockets); Jupyter Server
        reads `Authorization: token ...`. Same secret, so pass it on under the name Jupyter reads."""
        request = self.request  # type: ignore[attr-defined]
        if request.headers.get("Authorization"):
            return
        value = request.headers.get("X-Auth-Token")
        if not value:
            raw = request.query_arguments.get("X-Auth-Token")
            value = raw[-1].decode("utf-8", "replace") if raw else ""
        if value:
            request.headers["Authorization"] = f"token {value}"

    def _log(self) -> None:
        """Jupyter Server's access line, the URI (and Referer) scrubbed first of Run-Flare's query credentials in
        any spelling: Jupyter scrubs query keys that contain "token", as written; "X-Auth-Token" does not, and
        under this extension its value is the Jupyter server's own token."""
        request = self.request  # type: ignore[attr-defined]
        request.uri = scrub_uri(request.uri or "")
        if "Referer" in request.headers:
            request.headers["Referer"] = scrub_uri(request.headers["Referer"])
        super()._log()  # type: ignore[misc]

    def check_xsrf_cookie(self) -> None:
        """Jupyter's rules (token-authenticated: no XSRF check), plus: a cookie-authenticated request whose Origin
        is this very server passes (the playground page sends no _xsrf; a cross-site page cannot forge Origin)."""
        if getattr(self, "_jupyter_current_user", None) is not None:
            origin = self.request.headers.get("Origin")  # type: ignore[attr-defined]
            if origin:
                parsed = urlparse(origin)
                if parsed.netloc == self.request.host and parsed.scheme == self.request.protocol:  # type: ignore[attr-defined]
                    return None
        return JupyterHandler.check_xsrf_cookie(self)  # type: ignore[arg-type]

    async def prepare(self) -> None:
        self._token_from_runflare_header()
        await self.settings["runflare"].ready()  # type: ignore[attr-defined]
        await JupyterHandler.prepare(self, _redirect_to_login=not self.api)  # type: ignore[arg-type]
        user = self.current_user  # type: ignore[attr-defined]
        if user is None:  # (Jupyter Server lets each handler refuse: allow_unauthenticated_access)
            if not self.api:  # a page: as @web.authenticated does, to the login page on GET, else 403
                return web.authenticated(lambda handler: None)(self)
            raise web.HTTPError(403)
        action = "read" if self.request.method in READ_METHODS else "execute"  # type: ignore[attr-defined]
        allowed = self.authorizer.is_authorized(self, user, action, "kernels")  # type: ignore[attr-defined]
        if inspect.isawaitable(allowed):
            allowed = await allowed
        if not allowed:
            raise web.HTTPError(403)
        if self.runflare_prepare is not None:
            result = self.runflare_prepare()
            if inspect.isawaitable(result):
                await result


def gated(handler: type) -> type:
    """Run-Flare's handler class with the gate in front and JupyterHandler behind."""
    own_prepare = handler.prepare if handler.prepare is not web.RequestHandler.prepare else None
    is_api = issubclass(handler, (BaseHandler, websocket.WebSocketHandler))
    namespace: dict[str, Any] = {"api": is_api, "__module__": __name__}
    if own_prepare is not None:
        namespace["runflare_prepare"] = lambda self: own_prepare(self)
    return type(f"Jupyter{handler.__name__}", (JupyterGate, handler, JupyterHandler), namespace)


class PlaygroundHandler(HomeHandler):
    """The playground page; it talks to the server named by ?server=, so point that at this prefix."""

    def get(self) -> None:
        if "server" not in self.request.query_arguments:
            base = f"{self.request.protocol}://{self.request.host}" + url_path_join(
                self.settings.get("base_url", "/"), PREFIX)
            return self.redirect(url_path_join(self.settings.get("base_url", "/"), PREFIX, "/")
                                 + "?server=" + quote(base, safe=""))
        return super().get()


def routes() -> list[tuple[str, type]]:
    """Run-Flare's route table under /runflare (base_url is prepended by ExtensionApp)."""
    out: list[tuple[str, type]] = []
    for _, pattern, handler in ROUTES:
        if handler is HomeHandler:
            handler = PlaygroundHandler
        out.append((PREFIX + pattern, gated(handler)))
    return out


class PrefixRedirect(JupyterHandler):
    """{base_url}/runflare -> {base_url}/runflare/."""

    @web.authenticated
    def get(self) -> None:
        self.redirect(url_path_join(self.base_url, PREFIX, "/"))


class RunflareExtension(ExtensionApp):
    """Run-Flare inside Jupyter Server."""

    name = "runflare"
    description = "Run-Flare's REST and WebSocket API and playground under {base_url}/runflare"
    load_other_extensions = True

    settings_overrides = Dict(
        {}, config=True,
        help="Run-Flare settings (the names of runflare_server.config.Settings) over the RUNFLARE_* environment, "
             "e.g. {'kernel_pool': {'python3': 1}, 'data_dir': '/srv/runflare'}.")
    kernel_env = Bool(
        True, config=True,
        help=f"Give the server's kernels ${URL_ENV} and ${TOKEN_ENV}, so %runflare finds this extension "
             "with no configuration (an explicitly set $RUNFLARE_URL is left alone).")
    kernel_url_host = Unicode(
        "", config=True,
        help="The host kernels use to reach this server (default: 127.0.0.1, or ServerApp.ip when it is "
             "a specific address).")

    def initialize_settings(self) -> None:
        overrides = dict(self.settings_overrides)
        # Jupyter Server's authentication replaces Run-Flare's X-Auth-Token list under this prefix.
        overrides["auth_tokens"] = []
        self.runflare_settings = Settings(**overrides)
        self.service = Service(self.runflare_settings)
        self._ready: asyncio.Future[None] | None = None
        self.settings["service"] = self.service  # what Run-Flare's handlers read from application.settings

    def initialize_handlers(self) -> None:
        self.handlers.append((PREFIX, PrefixRedirect))
        self.handlers.extend(routes())

    def _future(self) -> asyncio.Future[None]:
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_future()
        return self._ready

    async def ready(self) -> None:
        """Returns once the service has started (at once afterwards); raises if it failed to start."""
        await asyncio.shield(self._future())

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        future = self._future()
        try:
            await self.service.start(listen=False)
        except BaseException as exc:
            self.log.error("Run-Flare did not start: %s", exc)
            future.set_exception(web.HTTPError(503, "Run-Flare did not start"))
            future.exception()  # consumed here; requests see it through ready()
            raise
        future.set_result(None)
        if self.kernel_env:
            self.set_kernel_env(serverapp)
        self.log.info("Run-Flare at %s (data in %s)", self.kernel_url(serverapp), self.runflare_settings.data_dir)

    def kernel_url(self, serverapp: Any) -> str:
        scheme = "https" if serverapp.certfile else "http"
        host = self.kernel_url_host
        if not host:
            ip = serverapp.ip or ""
            host = ip if ip and ip not in ("0.0.0.0", "::", "*", "localhost", "") else "127.0.0.1"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{scheme}://{host}:{serverapp.port}" + url_path_join(serverapp.base_url, PREFIX)

    def set_kernel_env(self, serverapp: Any) -> None:
        """Kernels inherit the server's environment (jupyter_client starts them with a copy of os.environ),
        so the URL and a token go there. Under JupyterHub there is no server token; the single-user server's
        own $JUPYTERHUB_API_TOKEN (also in its kernels' environment) is accepted by the hub's identity provider."""
        if os.environ.get(URL_ENV) or serverapp.sock:
            return
        os.environ[URL_ENV] = self.kernel_url(serverapp)
        token = getattr(serverapp.identity_provider, "token", "") or os.environ.get("JUPYTERHUB_API_TOKEN", "")
        if token and not os.environ.get(TOKEN_ENV):
            os.environ[TOKEN_ENV] = token

    async def stop_extension(self) -> None:
        if self._ready is not None and self._ready.done() and self._ready.exception() is None:
            await self.service.stop()
