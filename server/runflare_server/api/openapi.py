"""GET /api/v1/openapi.json: the OpenAPI 3 description, generated from the pydantic models."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .. import __version__
from ..models import BatchCreate, ErrorBody, Language, StatusModel, SubmissionCreate, SubmissionView
from .base import BaseHandler

MODELS: list[type[BaseModel]] = [SubmissionCreate, SubmissionView, BatchCreate, Language, StatusModel, ErrorBody]


def ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def body(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def build_openapi() -> dict[str, Any]:
    """The whole document; schemas come from the models, routes from this table."""
    _, defs = models_json_schema([(m, "serialization") for m in MODELS], ref_template="#/components/schemas/{model}")
    q = lambda name, desc, schema=None: {"name": name, "in": "query", "required": False,  # noqa: E731
                                         "description": desc, "schema": schema or {"type": "string"}}
    fields = q("fields", "comma-separated field names, or *")
    b64 = q("base64_encoded", "text fields travel base64", {"type": "boolean"})
    token = {"name": "token", "in": "path", "required": True, "schema": {"type": "string"}}
    errors = {"400": body(ref(ErrorBody), "Bad request"), "401": {"description": "Missing or bad X-Auth-Token"},
              "422": body({"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}}},
                          "Field errors")}
    paths = {
        "/submissions": {
            "post": {"summary": "Create a submission", "parameters": [b64, fields, q("wait", "wait for the result",
                     {"type": "boolean"})], "requestBody": {"required": True, "content": {"application/json": {
                     "schema": ref(SubmissionCreate)}}}, "responses": {"201": body(ref(SubmissionView), "Created"),
                     "415": body(ref(ErrorBody)), "503": body(ref(ErrorBody)), **errors}},
            "get": {"summary": "List submissions (X-Auth-User)", "parameters": [fields, q("page", "page"),
                    q("per_page", "per page")], "responses": {"200": body({"type": "object"}), **errors}},
        },
        "/submissions/{token}": {
            "get": {"summary": "Get a submission", "parameters": [token, b64, fields],
                    "responses": {"200": body(ref(SubmissionView)), "404": body(ref(ErrorBody))}},
            "delete": {"summary": "Delete a submission (X-Auth-User)", "parameters": [token, fields],
                       "responses": {"200": body(ref(SubmissionView)), "404": body(ref(ErrorBody))}},
        },
        "/submissions/batch": {
            "post": {"summary": "Create up to 20 submissions", "parameters": [b64], "requestBody": {
                     "content": {"application/json": {"schema": ref(BatchCreate)}}},
                     "responses": {"201": body({"type": "array", "items": {"type": "object"}}), **errors}},
            "get": {"summary": "Get several submissions", "parameters": [q("tokens", "comma-separated"), b64, fields],
                    "responses": {"200": body({"type": "object"})}},
        },
        "/submissions/{token}/ws": {"get": {"summary": "WebSocket: the submission's events, replayed then live",
                                            "parameters": [token, q("since", "resume after this seq")],
                                            "responses": {"101": {"description": "Switching Protocols"},
                                                          "404": body(ref(ErrorBody))}}},
        "/languages": {"get": {"summary": "Available languages",
                               "responses": {"200": body({"type": "array", "items": ref(Language)})}}},
        "/languages/all": {"get": {"summary": "All languages",
                                   "responses": {"200": body({"type": "array", "items": ref(Language)})}}},
        "/languages/{id}": {"get": {"summary": "One language", "parameters": [
            {"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}],
            "responses": {"200": body(ref(Language)), "404": body(ref(ErrorBody))}}},
        "/statuses": {"get": {"summary": "Statuses",
                              "responses": {"200": body({"type": "array", "items": ref(StatusModel)})}}},
        "/about": {"get": {"summary": "About", "responses": {"200": body({"type": "object"})}}},
        "/config_info": {"get": {"summary": "Configuration", "responses": {"200": body({"type": "object"})}}},
        "/health": {"get": {"summary": "(RF) Health", "responses": {"200": body({"type": "object"})}}},
        "/openapi.json": {"get": {"summary": "(RF) This document", "responses": {"200": body({"type": "object"})}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Run-Flare", "version": __version__,
                 "description": "Judge0-compatible code execution through managed Jupyter kernels."},
        "servers": [{"url": "/api/v1"}],
        "paths": paths,
        "components": {
            "schemas": defs["$defs"],
            "securitySchemes": {"authToken": {"type": "apiKey", "in": "header", "name": "X-Auth-Token"},
                                "authUser": {"type": "apiKey", "in": "header", "name": "X-Auth-User"}},
        },
    }


class OpenApiHandler(BaseHandler):
    def get(self) -> None:
        self.send(build_openapi())
