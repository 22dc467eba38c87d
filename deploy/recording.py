"""Dry runs that drive the real Scaleway SDK with `_request` recording instead of sending.

Shared by the container deploy (`deploy.scaleway`) and the overflow job definition
(`deploy.serverless_jobs`): both print the exact method, path, query and body (as marshalled by
this SDK version) that a real run would send, each with the condition under which it is sent.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from scaleway_core.client import Client


class Captured(Exception):
    """Raised by `RecordingMixin._request` instead of sending anything."""


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def dry_run_client(project_id: str | None, region: str) -> Client:
    """A client with no credentials: the recording APIs never send a request."""
    return Client(
        default_project_id=project_id or "<SCW_DEFAULT_PROJECT_ID>", default_region=region
    )


class RecordingMixin:
    """Put before an SDK API class: every call is recorded in `recorded`, none is sent."""

    recorded: list[dict[str, Any]]

    def shown_body(self, body: Any) -> Any:
        """The body as the dry run prints it (override to redact)."""
        return body

    def _request(
        self,
        method: str,
        path: str,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        body: Any = None,
    ) -> Any:
        entry: dict[str, Any] = {"method": method.upper(), "path": path}
        query = {k: v for k, v in (params or {}).items() if v is not None}
        if query:
            entry["query"] = query
        if body is not None:
            entry["body"] = self.shown_body(body)
        self.recorded.append(entry)
        raise Captured


def capture(
    api: RecordingMixin, calls: Sequence[tuple[str, Callable[[], object]]]
) -> list[dict[str, Any]]:
    """Run each SDK call on a recording API; its request, with its condition (`when`)."""
    requests: list[dict[str, Any]] = []
    for when, call in calls:
        try:
            call()
        except Captured:
            requests.append({"when": when, **api.recorded[-1]})
    return jsonable(requests)  # type: ignore[no-any-return]
