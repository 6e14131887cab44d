"""The Tornado application: routes to thin handlers over the service's managers."""

from __future__ import annotations

from pathlib import Path

from tornado import web

from ..service import Service
from .base import NotFoundHandler
from .openapi import OpenApiHandler
from .reference import (
    AboutHandler,
    AllLanguagesHandler,
    ConfigInfoHandler,
    HealthHandler,
    LanguageHandler,
    LanguagesHandler,
    StatusesHandler,
)
from .submissions import BatchHandler, SubmissionHandler, SubmissionsHandler
from .websocket import SubmissionSocket, websocket_settings

STATIC = Path(__file__).resolve().parent.parent / "static"
TOKEN = r"([^/]+)"


class HomeHandler(web.RequestHandler):
    """The playground page at /."""

    def get(self) -> None:
        page = STATIC / "index.html"
        if not page.exists():
            raise web.HTTPError(404)
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.finish(page.read_bytes())


def make_app(service: Service) -> web.Application:
    prefix = "/api/v1"
    routes = [
        (r"/", HomeHandler),
        (prefix + r"/submissions/?", SubmissionsHandler),
        (prefix + r"/submissions/batch/?", BatchHandler),
        (prefix + r"/submissions/" + TOKEN + r"/ws/?", SubmissionSocket),
        (prefix + r"/submissions/" + TOKEN + r"/?", SubmissionHandler),
        (prefix + r"/languages/?", LanguagesHandler),
        (prefix + r"/languages/all/?", AllLanguagesHandler),
        (prefix + r"/languages/(\d+)/?", LanguageHandler),
        (prefix + r"/statuses/?", StatusesHandler),
        (prefix + r"/about/?", AboutHandler),
        (prefix + r"/config_info/?", ConfigInfoHandler),
        (prefix + r"/health/?", HealthHandler),
        (prefix + r"/openapi.json", OpenApiHandler),
    ]
    return web.Application(routes, service=service, default_handler_class=NotFoundHandler,
                           **websocket_settings(service.settings))
