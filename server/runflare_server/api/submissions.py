"""Submission routes: create (wait, base64, fields), get, batch, list, delete."""

from __future__ import annotations

from typing import Any

from ..models import NotUtf8, parse_fields, render
from ..statuses import is_final
from ..submissions import QueueFull
from .base import QUEUE_FULL_RETRY_AFTER, ApiError, BaseHandler

NOT_UTF8 = ("some attributes for this submission cannot be converted to UTF-8, "
            "use base64_encoded=true query parameter")


class SubmissionHandlerBase(BaseHandler):
    def fields(self) -> list[str]:
        """`fields`, and `base64_encoded` checked with it (400 for either before any work)."""
        self.base64_encoded = self.flag("base64_encoded")
        try:
            return parse_fields(self.query("fields"))
        except ValueError as exc:
            raise ApiError(400, {"error": str(exc)}) from None

    def view(self, sub: dict[str, Any], fields: list[str]) -> dict[str, Any]:
        try:
            return render(sub, fields, self.base64_encoded, self.service.language_names)
        except NotUtf8:
            return {"token": sub["token"], "error": NOT_UTF8}

    def lookup(self, sub: dict[str, Any] | None) -> dict[str, Any]:
        if sub is None:
            raise ApiError(404, {"error": "Not Found"})
        return sub

    async def create(self, bodies: list[Any], watch: bool = False) -> list[dict[str, Any]]:
        try:
            return await self.service.submissions.create_many(bodies, self.flag("base64_encoded"), watch)
        except QueueFull:
            raise ApiError(503, {"error": "queue is full"}, {"Retry-After": str(QUEUE_FULL_RETRY_AFTER)}) from None


class SubmissionsHandler(SubmissionHandlerBase):
    """POST creates one submission; GET lists them (needs X-Auth-User)."""

    needs_user = {"GET"}

    async def post(self) -> None:
        fields = self.fields()
        body = self.json_body()
        wait = self.flag("wait")
        if wait and not self.service.settings.enable_wait_result:
            raise ApiError(400, {"error": "wait not allowed"})
        (answer,) = await self.create([body], watch=wait)
        if "token" not in answer:
            raise ApiError(422, answer)
        if not wait:
            return self.send(answer, 201)
        sub = self.lookup(await self.service.submissions.wait(answer["token"], self.service.settings.wait_cap_seconds,
                                                             just_created=True))
        if not is_final(sub["status_id"]):
            return self.send(self.view(sub, ["token", "status"]), 201)
        self.send(self.view(sub, fields), 201)

    async def get(self) -> None:
        fields = self.fields()
        page = min(10**9, max(1, self.integer("page", 1)))
        per_page = min(100, max(1, self.integer("per_page", 20)))
        subs, meta = await self.service.submissions.page(page, per_page)
        self.send({"submissions": [self.view(sub, fields) for sub in subs], "meta": meta})


class SubmissionHandler(SubmissionHandlerBase):
    """GET one submission; DELETE it (needs X-Auth-User and enable_submission_delete)."""

    needs_user = {"DELETE"}

    async def get(self, token: str) -> None:
        fields = self.fields()
        self.send(self.view(self.lookup(await self.service.submissions.get(token)), fields))

    async def delete(self, token: str) -> None:
        fields = self.fields()
        if not self.service.settings.enable_submission_delete:
            raise ApiError(400, {"error": "delete not allowed"})
        sub = self.lookup(await self.service.submissions.get(token))
        if not is_final(sub["status_id"]):
            raise ApiError(400, {"error": "submission cannot be deleted because it is queued or running"})
        await self.service.submissions.delete(token)
        self.send(self.view(sub, fields))


class BatchHandler(SubmissionHandlerBase):
    """POST {"submissions": [...]} creates up to max_submission_batch_size; GET ?tokens=a,b reads them."""

    async def post(self) -> None:
        settings = self.service.settings
        self.flag("base64_encoded")
        if not settings.enable_batched_submissions:
            raise ApiError(400, {"error": "batched submissions are not allowed"})
        body = self.json_body()
        items = body.get("submissions") if isinstance(body, dict) else None
        if not isinstance(items, list) or not items:
            raise ApiError(400, {"error": "there should be at least one submission in a batch"})
        if len(items) > settings.max_submission_batch_size:
            raise ApiError(400, {"error": "number of submissions in a batch should be less than or equal to "
                                          f"{settings.max_submission_batch_size}"})
        self.send(await self.create(items), 201)

    async def get(self) -> None:
        settings = self.service.settings
        if not settings.enable_batched_submissions:
            raise ApiError(400, {"error": "batched submissions are not allowed"})
        fields = self.fields()
        tokens = [t for t in (self.query("tokens") or "").split(",") if t.strip(" ")]
        if not tokens:
            raise ApiError(400, {"error": "there should be at least one token in a batch"})
        if len(tokens) > settings.max_submission_batch_size:
            raise ApiError(400, {"error": "number of tokens in a batch should be less than or equal to "
                                          f"{settings.max_submission_batch_size}"})
        subs = await self.service.submissions.get_many([t.strip(" ") for t in tokens])
        self.send({"submissions": [self.view(sub, fields) if sub else None for sub in subs]})
