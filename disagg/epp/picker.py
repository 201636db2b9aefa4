"""The endpoint picker's decision for one HTTP request, independent of how it arrived (ext_proc
stream or `POST /v1/pick`): the headers to set, or the status to refuse with, or, while every
decode is saturated, a place in the flow-control queue (`Waiting`) whose callback gets one of those
later (`disagg.epp.flow_control`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

from disagg.config import FlowControlConfig
from disagg.epp.flow_control import (DROPPED_REASON_HEADER, NO_ENDPOINT, Dropped, FlowControl, FlowKey, Waiting,
                                     record_drop)
from disagg.epp.prompt import PromptReader, openai_kind
from disagg.openai.body import check_json_content_type
from disagg.epp.protocol import DESTINATION_HEADER, PREFILLER_HEADER
from disagg.openai.errors import APIError, error_body
from disagg.routing import NoEndpointError, Pick, PickRequest, Scheduler
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
    # Response headers for the client (`x-disagg-dropped-reason` on a refusal for capacity).
    headers: dict[str, str] = field(default_factory=dict)


Decision = Routed | Refused


class EndpointPicker:
    """Reads a request, then picks through flow control. `flow_control` defaults to the
    scheduler's `routing.flow_control`."""

    def __init__(self, scheduler: Scheduler, reader: PromptReader,
                 flow_control: FlowControlConfig | None = None, *, max_request_bytes: int = 4 * 2**20) -> None:
        self.scheduler = scheduler
        self.reader = reader
        self.max_request_bytes = max_request_bytes
        self.flow: FlowControl[Decision] = FlowControl(
            flow_control if flow_control is not None else scheduler.config.flow_control,
            pick=self._pick, refuse=self._refuse_dropped, headroom=self._headroom)
        scheduler.pool.on_load(lambda endpoint: self.flow.notify())  # a load report may free room

    def screen(self, method: str, path: str, content_type: str | None, size: int) -> Refused | None:
        """What the workers would refuse on the headers alone, refused before the body is read:
        an OpenAI POST that is not JSON (415) or larger than `max_request_bytes` (413)."""
        if method != "POST" or openai_kind(path) is None:
            return None
        try:
            check_json_content_type(content_type)
            if size > self.max_request_bytes:
                raise APIError(413, f"request body of {size} bytes; the limit is {self.max_request_bytes}",
                               code="request_too_large")
        except APIError as exc:
            return self._refuse(exc.status, exc.body())
        return None

    def route(self, path: str, body: bytes, subset: list[str] | None = None, *,
              headers: Mapping[str, str] | None = None, deadline: float | None = None) -> Decision | Waiting[Decision]:
        """Read the request (path, body and the flow-control headers, lower-case names, as the
        client sent them), then pick or wait (until `deadline`, monotonic seconds, at the latest)."""
        try:
            request = self.reader.read(path, body, subset)
        except APIError as exc:
            metrics.PICK_ERRORS.labels("bad_request" if exc.status == 400 else f"http_{exc.status}").inc()
            return self._refuse(exc.status, exc.body())
        return self.route_tokens(request, headers=headers, size=len(body), deadline=deadline)

    def route_tokens(self, request: PickRequest, *, headers: Mapping[str, str] | None = None, size: int = 0,
                     deadline: float | None = None) -> Decision | Waiting[Decision]:
        """Pick (or wait) for a request already tokenized; `size`: the bytes it holds while waiting."""
        try:
            key = self.flow.key(headers or {})
        except ValueError as exc:
            return self._refuse(400, error_body(400, str(exc)))
        return self.flow.admit(request, key, size=size, deadline=deadline)

    def _pick(self, request: PickRequest, key: FlowKey) -> Decision:
        """Pick now; raises OverloadedError when every decode is saturated (flow control waits)."""
        try:
            pick = self.scheduler.pick(request)
        except NoEndpointError as exc:
            record_drop(NO_ENDPOINT, key)
            return self._refuse_dropped(Dropped(503, NO_ENDPOINT, str(exc)), key)
        headers = {DESTINATION_HEADER: ",".join(pick.decode_addresses)}
        remove: list[str] = []
        if pick.prefill:
            headers[PREFILLER_HEADER] = ",".join(pick.prefill_addresses)
        else:
            remove.append(PREFILLER_HEADER)
        metrics.EPP_REQUESTS.labels("200").inc()
        return Routed(pick, headers, remove)

    def _headroom(self, want: int) -> int:
        """How many more requests the live decodes can take before each reports
        `max_waiting_per_worker` waiting, counting the picks sent since their reports (at most
        `want`). With no live decode, nothing is saturated: the picks say what happens (a pick of
        the most recently seen, or 503)."""
        pool, limit = self.scheduler.pool, self.scheduler.config.max_waiting_per_worker
        live = pool.live("decode", pool.clock())
        if not live:
            return want
        room = 0
        for endpoint in live:
            room += max(0, limit - endpoint.backlog - endpoint.pending)
            if room >= want:
                return want
        return room

    def _refuse_dropped(self, dropped: Dropped, key: FlowKey) -> Refused:
        return self._refuse(dropped.status, error_body(dropped.status, dropped.message),
                            {DROPPED_REASON_HEADER: dropped.reason})

    @staticmethod
    def _refuse(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Refused:
        metrics.EPP_REQUESTS.labels(str(status)).inc()
        return Refused(status, body, headers or {})
