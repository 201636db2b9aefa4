"""The endpoint picker's decision for one HTTP request, independent of how it arrived (ext_proc
stream or `POST /v1/pick`): the headers to set, or the status to refuse with."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from disagg.epp.prompt import PromptReader
from disagg.epp.protocol import DESTINATION_HEADER, PREFILLER_HEADER
from disagg.openai.errors import APIError, error_body
from disagg.routing import NoEndpointError, OverloadedError, Pick, PickRequest, Scheduler
from disagg.routing import metrics

log = logging.getLogger(__name__)


@dataclass
class Routed:
    pick: Pick
    # Headers the proxy must set on the upstream request (overwriting any the client sent).
    headers: dict[str, str]
    # Headers the proxy must remove: a client may not choose the prefill worker itself.
    remove: list[str] = field(default_factory=list)

    @property
    def destination(self) -> str:
        return self.headers[DESTINATION_HEADER]

    def to_json(self) -> dict[str, Any]:
        p = self.pick
        return {
            "decode": p.decode_addresses,
            "prefill": p.prefill_addresses,
            "decision": p.decision,
            "uncached_tokens": p.uncached_tokens,
            "cached_tokens": p.cached_tokens,
            "headers": self.headers,
        }


@dataclass
class Refused:
    status: int
    body: dict[str, Any]


class EndpointPicker:
    def __init__(self, scheduler: Scheduler, reader: PromptReader) -> None:
        self.scheduler = scheduler
        self.reader = reader

    def route(self, path: str, body: bytes, subset: list[str] | None = None) -> Routed | Refused:
        """Read the request (path and body as the client sent them), then pick."""
        try:
            request = self.reader.read(path, body, subset)
        except APIError as exc:
            metrics.PICK_ERRORS.labels("bad_request" if exc.status == 400 else f"http_{exc.status}").inc()
            return self._refuse(exc.status, exc.body())
        return self.route_tokens(request)

    def route_tokens(self, request: PickRequest) -> Routed | Refused:
        """Pick for a request already tokenized."""
        try:
            pick = self.scheduler.pick(request)
        except OverloadedError as exc:
            return self._refuse(429, error_body(429, str(exc)))
        except NoEndpointError as exc:
            return self._refuse(503, error_body(503, str(exc)))
        headers = {DESTINATION_HEADER: ",".join(pick.decode_addresses)}
        remove: list[str] = []
        if pick.prefill:
            headers[PREFILLER_HEADER] = ",".join(pick.prefill_addresses)
        else:
            remove.append(PREFILLER_HEADER)
        metrics.EPP_REQUESTS.labels("200").inc()
        return Routed(pick, headers, remove)

    @staticmethod
    def _refuse(status: int, body: dict[str, Any]) -> Refused:
        metrics.EPP_REQUESTS.labels(str(status)).inc()
        return Refused(status, body)
