"""GET /api/v1/openapi.json: the OpenAPI 3.1 description, generated from the pydantic models, this server's
settings and languages, and the route table that serves the requests (api.ROUTES).

Every status code a handler can answer is declared on its operation; a route's documented methods are
exactly the methods its handler implements (checked here), and any other method is 405 with `Allow`.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .. import __version__
from ..models import (
    FIELDS_PATTERN,
    RANGES,
    BatchCreate,
    ErrorBody,
    Language,
    LanguageRef,
    NotUtf8View,
    StatusModel,
    SubmissionCreate,
    SubmissionView,
)
from ..service import Service
from .base import BaseHandler, implemented_methods

MODELS: list[type[BaseModel]] = [SubmissionCreate, SubmissionView, NotUtf8View, BatchCreate, Language, LanguageRef,
                                 StatusModel, ErrorBody]
BOOLEAN_QUERY = {"type": "boolean"}  # on the wire exactly `true` or `false` (BaseHandler.flag); else 400
TOKENS_PATTERN = "[^ ,]"  # at least one token (BatchHandler.get)


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def body(schema: dict[str, Any] | None, description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description}
    if schema is not None:
        answer["content"] = {"application/json": {"schema": schema}}
    if headers:
        answer["headers"] = headers
    return answer


def query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


FIELD_ERRORS = {"type": "object", "description": "Judge0's field errors: {field: [message, ...]}",
                "minProperties": 1, "additionalProperties": {"type": "array", "items": {"type": "string"}}}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "required": True,
                               "schema": {"type": "string", "pattern": "^[0-9]+$"}}}
ERROR = ref("ErrorBody")
SUBMISSION_OR_NOT_UTF8 = {"anyOf": [ref("SubmissionView"), ref("NotUtf8View")]}


def submission_create_schema(service: Service) -> dict[str, Any]:
    """SubmissionCreate's schema narrowed to what this server accepts: its languages, kernels, ranges and
    switches (a body valid here is accepted unless its content fails a rule a schema cannot say, such as
    base64 that does not decode when base64_encoded=true, or a callback host that resolves to a refused address)."""
    schema = copy.deepcopy(SubmissionCreate.model_json_schema(ref_template="#/components/schemas/{model}"))
    props = schema["properties"]
    s = service.settings

    def narrow(name: str, **extra: Any) -> None:
        nullable = props[name].get("anyOf", [{"type": props[name].get("type")}])
        kinds = [k for k in nullable if k.get("type") != "null"]
        props[name] = {**{k: v for k, v in props[name].items() if k != "anyOf"},
                       "anyOf": [{**kinds[0], **extra}, {"type": "null"}]}

    ids = sorted(service.language_names)
    if ids:
        narrow("language_id", enum=ids)
    kernels = sorted(service.rules.kernelspecs)
    if kernels:
        narrow("kernel", enum=kernels)
    else:
        props["kernel"] = {"type": "null", "description": props["kernel"].get("description", "")}
    for name, (low, high_key) in RANGES.items():
        narrow(name, minimum=low, maximum=getattr(s, high_key))
    for name in ("compiler_options", "command_line_arguments"):
        narrow(name, maxLength=512)
    if not s.enable_compiler_options or s.allowed_languages_for_compile_options:
        narrow("compiler_options", maxLength=0)
    if not s.enable_command_line_arguments:
        narrow("command_line_arguments", maxLength=0)
    if not s.enable_callbacks:
        props["callback_url"] = {"type": "null"}
    else:
        narrow("callback_url", format="uri", pattern="^https?://[A-Za-z0-9.-]+(:[0-9]+)?(/[A-Za-z0-9._~/-]*)?$")
    if not s.enable_additional_files:
        props["additional_files"] = {"type": "null", "description": "not supported by this server"}
    if not s.allow_enable_network:
        narrow("enable_network", const=False)
    for flag in ("enable_per_process_and_thread_time_limit", "enable_per_process_and_thread_memory_limit"):
        if not getattr(s, "allow_" + flag):
            narrow(flag, const=False)
    narrow("source_code", minLength=1)
    props["source_code"]["anyOf"] = props["source_code"]["anyOf"][:1]  # required: never null
    schema["required"] = ["source_code"]
    # language_id, or (RF) a kernel to run on
    schema["anyOf"] = [{"required": ["language_id"], "properties": {"language_id": {"type": "integer"}}},
                       {"required": ["kernel"], "properties": {"kernel": {"type": "string"}}}]
    schema["description"] = ("The body of POST /submissions. Unknown keys are ignored, as Judge0 does. "
                             "With base64_encoded=true, source_code, stdin and expected_output are base64.")
    return schema


def response_schemas() -> dict[str, Any]:
    """Schemas of answers: a type without null is never null; no key is required in a submission because
    `fields` picks them."""
    _, defs = models_json_schema([(m, "serialization") for m in MODELS], ref_template="#/components/schemas/{model}")
    schemas = defs["$defs"]
    view = schemas["SubmissionView"]
    view.pop("required", None)
    for prop in view["properties"].values():
        prop.pop("default", None)
    return schemas


def build_openapi(service: Service, routes: list[tuple[str, str, type]]) -> dict[str, Any]:
    """The whole document, from the route table (OpenAPI path, regex, handler) and each handler's OPERATIONS."""
    paths: dict[str, Any] = {}
    for path, _, handler in routes:
        if not path.startswith("/api/v1/"):
            continue
        ops = OPERATIONS[handler.__name__](service)
        implemented = implemented_methods(handler)
        documented = {method.upper() for method in ops}
        if documented != implemented - {"OPTIONS"}:  # OPTIONS: the CORS preflight of every route
            raise RuntimeError(f"{path}: documented {sorted(documented)} but {handler.__name__} "
                               f"implements {sorted(implemented)}")
        for method, op in ops.items():
            responses = op["responses"]
            responses.setdefault("401", {"description": "missing or wrong X-Auth-Token (empty body)"})
            if method in ("post", "delete"):
                responses.setdefault("503", body(ERROR, "maintenance mode, the queue is full, or the store or "
                                                        "the queue is briefly unavailable", RETRY_AFTER))
            else:
                responses.setdefault("503", body(ERROR, "the store or the queue is briefly unavailable",
                                                 RETRY_AFTER))
            responses.setdefault("413", body(ERROR, "body larger than max_body_size"))
            op.setdefault("security", [{"authToken": []}] if service.settings.auth_tokens else [{}, {"authToken": []}])
        paths[path[len("/api/v1"):]] = ops
    schemas = response_schemas()
    schemas["SubmissionCreate"] = submission_create_schema(service)
    n = service.settings.max_submission_batch_size
    schemas["BatchCreate"]["properties"]["submissions"].update(minItems=1, maxItems=n, items={
        "description": "a submission body (SubmissionCreate), validated on its own: its field errors come back "
                       "in its place in the 201 answer"})
    return {
        "openapi": "3.1.0",
        "info": {"title": "Run-Flare", "version": __version__,
                 "description": "Judge0-compatible code execution through managed Jupyter kernels."},
        "servers": [{"url": "/api/v1"}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"authToken": {"type": "apiKey", "in": "header", "name": "X-Auth-Token"},
                                "authUser": {"type": "apiKey", "in": "header", "name": "X-Auth-User"}},
        },
    }


def _user_security(service: Service) -> list[dict[str, list]]:
    return [{"authToken": [], "authUser": []}] if service.settings.auth_tokens else [{"authUser": []}]


FIELDS = query("fields", "comma-separated field names; * for Judge0's 35, (RF) kernel, interactive, outputs and "
               "session only when named; unknown names are 400", {"type": "string", "pattern": FIELDS_PATTERN})
B64 = query("base64_encoded", "text fields travel base64", BOOLEAN_QUERY)
WAIT = query("wait", "answer with the finished submission (up to the server's wait cap)", BOOLEAN_QUERY)
TOKEN = {"name": "token", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[^/]+$"}}
BAD_QUERY = body(ERROR, "bad fields, base64_encoded or wait")
TOKEN_LINKS = {
    "GetSubmission": {"operationId": "getSubmission", "parameters": {"token": "$response.body#/token"}},
    "GetSubmissionBatch": {"operationId": "getSubmissionBatch", "parameters": {"tokens": "$response.body#/token"}},
    "DeleteSubmission": {"operationId": "deleteSubmission", "parameters": {"token": "$response.body#/token"}},
}


def _submissions(service: Service) -> dict[str, Any]:
    created = body(ref("SubmissionView"), "{token}, or with wait=true the submission (or its token and status "
                                         "when it is not finished within the wait cap)")
    created["links"] = TOKEN_LINKS
    return {
        "post": {"operationId": "createSubmission", "summary": "Create a submission", "parameters": [B64, WAIT, FIELDS],
                 "requestBody": {"required": True, "content": {"application/json": {"schema": ref("SubmissionCreate")}}},
                 "responses": {"201": created,
                               "400": body(ERROR, "malformed JSON, bad query parameter, or wait not allowed"),
                               "415": body(ERROR, "Content-Type is not application/json"),
                               "422": body(FIELD_ERRORS, "field errors")}},
        "get": {"operationId": "listSubmissions", "summary": "List submissions, newest first (X-Auth-User)",
                "parameters": [B64, FIELDS, query("page", "page number", {"type": "integer"}),
                               query("per_page", "per page (at most 100)", {"type": "integer"})],
                "security": _user_security(service),
                "responses": {"200": body({"type": "object", "required": ["submissions", "meta"],
                                           "additionalProperties": False, "properties": {
                                               "submissions": {"type": "array", "items": SUBMISSION_OR_NOT_UTF8},
                                               "meta": {"type": "object", "additionalProperties": False,
                                                        "required": ["current_page", "next_page", "prev_page",
                                                                     "total_pages", "total_count"],
                                                        "properties": {
                                                            "current_page": {"type": "integer"},
                                                            "next_page": {"type": ["integer", "null"]},
                                                            "prev_page": {"type": ["integer", "null"]},
                                                            "total_pages": {"type": "integer"},
                                                            "total_count": {"type": "integer"}}}}}, "a page"),
                              "400": body(ERROR, "bad fields, base64_encoded, page or per_page"),
                              "403": {"description": "X-Auth-User missing or not authorized (empty body)"}}},
    }


def _submission(service: Service) -> dict[str, Any]:
    return {
        "get": {"operationId": "getSubmission", "summary": "Get a submission", "parameters": [TOKEN, B64, FIELDS],
                "responses": {"200": body(SUBMISSION_OR_NOT_UTF8, "the submission; {token, error} when its text "
                                                                  "is not UTF-8 and base64_encoded is not true"),
                              "400": BAD_QUERY, "404": body(ERROR, "unknown token")}},
        "delete": {"operationId": "deleteSubmission", "summary": "Delete a finished submission (X-Auth-User)",
                   "parameters": [TOKEN, B64, FIELDS], "security": _user_security(service),
                   "responses": {"200": body(SUBMISSION_OR_NOT_UTF8, "the deleted submission"),
                                 "400": body(ERROR, "deletion disabled, still queued or running, or bad query"),
                                 "403": {"description": "X-Auth-User missing or not authorized (empty body)"},
                                 "404": body(ERROR, "unknown token")}},
    }


def _batch(service: Service) -> dict[str, Any]:
    n = service.settings.max_submission_batch_size
    return {
        "post": {"operationId": "createSubmissionBatch", "summary": f"Create 1 to {n} submissions", "parameters": [B64],
                 "requestBody": {"required": True, "content": {"application/json": {"schema": {
                     **ref("BatchCreate")}}}},
                 "responses": {"201": body({"type": "array", "items": {"anyOf": [
                     {"type": "object", "required": ["token"], "additionalProperties": False,
                      "properties": {"token": {"type": "string"}}}, FIELD_ERRORS]}}, "{token} or field errors, per item"),
                     "400": body(ERROR, "malformed JSON, an empty or oversized batch, batches disabled, bad query"),
                     "415": body(ERROR, "Content-Type is not application/json")}},
        "get": {"operationId": "getSubmissionBatch", "summary": f"Get 1 to {n} submissions",
                "parameters": [{**query("tokens", "comma-separated tokens", {"type": "string",
                                                                             "pattern": TOKENS_PATTERN}),
                                "required": True}, B64, FIELDS],
                "responses": {"200": body({"type": "object", "required": ["submissions"], "additionalProperties": False,
                                           "properties": {"submissions": {"type": "array", "items": {"anyOf": [
                                               SUBMISSION_OR_NOT_UTF8, {"type": "null"}]}}}},
                                          "the submissions in order, null for an unknown token"),
                              "400": body(ERROR, "no tokens, too many, batches disabled, or bad query")}},
    }


def _socket(service: Service) -> dict[str, Any]:
    return {"get": {"operationId": "followSubmission",
                    "summary": "(RF) WebSocket: the submission's events, replayed from `since`, then live",
                    "parameters": [TOKEN, query("since", "resume after this seq", {"type": "integer"})],
                    "responses": {"101": {"description": "Switching Protocols"},
                                  "400": body(ERROR, "since is not an integer"),
                                  "404": body(ERROR, "unknown token"),
                                  "426": body(ERROR, "not a WebSocket upgrade request",
                                              {"Upgrade": {"required": True, "schema": {"const": "websocket"}}})}}}


def _array_of(name: str, description: str) -> dict[str, Any]:
    return {"get": {"summary": description, "responses": {"200": body({"type": "array", "items": ref(name)}, "OK")}}}


def _object(description: str, **responses: Any) -> Any:
    return lambda service: {"get": {"summary": description, "responses": {
        "200": body({"type": "object"}, "OK"), **responses}}}


OPERATIONS: dict[str, Any] = {
    "SubmissionsHandler": _submissions,
    "SubmissionHandler": _submission,
    "BatchHandler": _batch,
    "SubmissionSocket": _socket,
    "LanguagesHandler": lambda service: _array_of("Language", "Languages this server can run, by name"),
    "AllLanguagesHandler": lambda service: _array_of("Language", "Every language, with is_archived"),
    "LanguageHandler": lambda service: {"get": {"summary": "One language", "parameters": [
        {"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}],  # 404 below 0
        "responses": {"200": body(ref("Language"), "OK"), "404": body(ERROR, "unknown id")}}},
    "StatusesHandler": lambda service: _array_of("StatusModel", "Statuses"),
    "AboutHandler": _object("About"),
    "ConfigInfoHandler": _object("Every Judge0 configuration key with this server's value"),
    "HealthHandler": _object("(RF) Health", **{"503": body({"type": "object"}, "degraded")}),
    "OpenApiHandler": _object("(RF) This document"),
}


class OpenApiHandler(BaseHandler):
    def get(self) -> None:
        from . import ROUTES

        self.send(build_openapi(self.service, ROUTES))
