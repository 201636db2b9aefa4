"""The Envoy ext_proc service of the GIE endpoint-picker protocol.

One gRPC stream per HTTP request. The EPP reads the request headers (path, subset hint in
filter metadata `envoy.lb.subset_hint`) and the body, picks, and answers with the destination
header `x-gateway-destination-endpoint` AND dynamic metadata `envoy.lb` with the same value
(plus `x-prefiller-host-port` when disaggregating), or an ImmediateResponse: 400 for a body that
is not an OpenAI request, 404 for an unknown model, 503 when nothing can serve, 429 when shedding.

Body modes (from `protocol_config`, which Envoy sends on the first message; `default_body_mode`
otherwise):
- BUFFERED: answer the headers at once, then pick on the whole body and put the header mutation
  in the BodyResponse.
- FULL_DUPLEX_STREAMED: hold the headers answer, buffer the body chunks to end of stream, pick,
  then send the HeadersResponse and the body back as StreamedBodyResponse chunks (Envoy forwards
  only what the EPP sends back).
- a request without a body (end_of_stream on the headers) is picked on its headers.
Once routed (or refused) the stream ends with OK: Envoy then skips the rest of the request's
ext_proc phases. Response phases, if Envoy is configured to send them first, pass unchanged.

While every decode is saturated a request waits in the EPP's flow control (its priority and
tenant from the request headers): its answer is then sent when it leaves the queue, through the
stream's `Reply`; what Envoy sends meanwhile is not answered (the stream ends with OK after the
answer, as it does at once otherwise), and a stream Envoy resets leaves the queue. A stream with
a `grpc-timeout` is answered before it runs out. (Envoy's `message_timeout` does not bound the wait
in FULL_DUPLEX_STREAMED mode: measured through our generated Envoy, a request waited its whole
TTL, 8 s, past the 5 s ext_proc timeouts.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import msgspec
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from disagg.epp.flow_control import FLOW_HEADERS, Waiting
from disagg.epp.h2grpc import LATER, Later, Reply
from disagg.epp.picker import Decision, EndpointPicker, Refused, Routed
from disagg.epp.protocol import BODY_CHUNK_BYTES, DESTINATION_HEADER, DESTINATION_NAMESPACE, SUBSET_KEY, SUBSET_NAMESPACE
from disagg.openai.errors import error_body

log = logging.getLogger(__name__)

BodyMode = int  # processing_mode_pb2.ProcessingMode.BodySendMode
BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED
FULL_DUPLEX_STREAMED = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


@dataclass
class _Exchange:
    """What one stream has seen of its HTTP request so far."""

    mode: BodyMode
    path: str = "/"
    subset: list[str] | None = None
    flow_headers: dict[str, str] | None = None  # priority, objective, tenant (when the client sent any)
    method: str = ""
    content_type: str | None = None
    size: int = 0  # body bytes so far
    chunks: list[bytes] = field(default_factory=list)  # the body as it arrives
    body: bytes = b""  # the whole body, once it has
    on_headers: bool = False  # routed on the headers (no body)
    waiting: Waiting[Decision] | None = None  # in the flow-control queue
    after: tuple[pb.ProcessingResponse, ...] = ()  # sent after the routing answer
    routed: bool = False  # routed or refused: nothing more to say on this stream


_FLOW_HEADERS = frozenset(FLOW_HEADERS)


def header_value(header: base_pb2.HeaderValue) -> str:
    return header.raw_value.decode("utf-8", "replace") if header.raw_value else header.value


def read_subset(metadata: base_pb2.Metadata) -> list[str] | None:
    """The subset hint: a list of "ip:port" (a comma-separated string is accepted too)."""
    if SUBSET_NAMESPACE not in metadata.filter_metadata:
        return None
    fields = metadata.filter_metadata[SUBSET_NAMESPACE].fields
    if SUBSET_KEY not in fields:
        return None
    value = fields[SUBSET_KEY]
    kind = value.WhichOneof("kind")
    if kind == "list_value":
        items = [v.string_value for v in value.list_value.values if v.WhichOneof("kind") == "string_value"]
    elif kind == "string_value":
        items = value.string_value.split(",")
    else:
        items = []
    return [i.strip() for i in items if i.strip()]


def routed_response(routed: Routed, *, as_headers: bool) -> pb.ProcessingResponse:
    """Set the picked endpoints' headers (and remove the client's prefiller header) in the
    `request_headers` or the `request_body` answer, with the same destination as metadata."""
    mutation = pb.HeaderMutation(
        set_headers=[base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode()),
                                                append_action=_OVERWRITE) for k, v in routed.headers.items()],
        remove_headers=routed.remove,
    )
    common = pb.CommonResponse(header_mutation=mutation, clear_route_cache=True)
    metadata = struct_pb2.Struct()
    metadata.update({DESTINATION_NAMESPACE: {DESTINATION_HEADER: routed.destination}})
    if as_headers:
        return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common), dynamic_metadata=metadata)
    return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common), dynamic_metadata=metadata)


def immediate(refused: Refused) -> pb.ProcessingResponse:
    headers = {"content-type": "application/json", **refused.headers}
    return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=refused.status),
        headers=pb.HeaderMutation(set_headers=[
            base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode()),
                                       append_action=_OVERWRITE) for k, v in headers.items()]),
        body=msgspec.json.encode(refused.body),
        details=f"disagg_epp_{refused.status}",
    ))


def streamed_body(chunk: bytes, end_of_stream: bool, *, request: bool = True) -> pb.ProcessingResponse:
    """A body chunk handed back to Envoy (FULL_DUPLEX_STREAMED)."""
    answer = pb.BodyResponse(response=pb.CommonResponse(body_mutation=pb.BodyMutation(
        streamed_response=pb.StreamedBodyResponse(body=chunk, end_of_stream=end_of_stream))))
    return pb.ProcessingResponse(request_body=answer) if request else pb.ProcessingResponse(response_body=answer)


CONTINUE = {
    "request_headers": pb.ProcessingResponse(request_headers=pb.HeadersResponse()),
    "request_body": pb.ProcessingResponse(request_body=pb.BodyResponse()),
    "request_trailers": pb.ProcessingResponse(request_trailers=pb.TrailersResponse()),
    "response_headers": pb.ProcessingResponse(response_headers=pb.HeadersResponse()),
    "response_body": pb.ProcessingResponse(response_body=pb.BodyResponse()),
    "response_trailers": pb.ProcessingResponse(response_trailers=pb.TrailersResponse()),
}


class ExternalProcessor:
    """The protocol: `answer` says what to send back for each message of a stream; `stream()`
    serves one stream of `disagg.epp.h2grpc.GrpcServer`."""

    def __init__(self, picker: EndpointPicker, *, default_body_mode: BodyMode = FULL_DUPLEX_STREAMED) -> None:
        self.picker = picker
        self.default_body_mode = default_body_mode

    def stream(self) -> ExtProcStream:
        return ExtProcStream(self)

    def answer(self, ex: _Exchange | None, message: pb.ProcessingRequest, *,
               deadline: float | None = None) -> tuple[_Exchange | None, list[pb.ProcessingResponse]]:
        """What to send back for one message of a stream, and the stream's state after it. When
        the request starts waiting (`ex.waiting`), its answer comes from `decided` later;
        `deadline` (monotonic seconds): when the client gives up on the stream."""
        phase = message.WhichOneof("request")
        if ex is not None and ex.waiting is not None:
            return ex, []
        if phase == "request_headers":
            mode = (message.protocol_config.request_body_mode
                    if message.HasField("protocol_config") else self.default_body_mode)
            ex = _Exchange(mode=mode, subset=read_subset(message.metadata_context))
            for h in message.request_headers.headers.headers:
                key = h.key
                if key == ":path":
                    ex.path = header_value(h)
                elif key == ":method":
                    ex.method = header_value(h)
                elif key == "content-type":
                    ex.content_type = header_value(h)
                elif key == "content-length" and header_value(h).isdigit():
                    ex.size = int(header_value(h))
                elif key in _FLOW_HEADERS:
                    if ex.flow_headers is None:
                        ex.flow_headers = {}
                    ex.flow_headers[key] = header_value(h)
            refused = self.picker.screen(ex.method, ex.path, ex.content_type, ex.size)
            if refused is not None:  # before reading a byte of the body
                ex.routed = True
                return ex, [immediate(refused)]
            if message.request_headers.end_of_stream:
                return ex, self._route(ex, on_headers=True, deadline=deadline)
            return ex, [] if ex.mode == FULL_DUPLEX_STREAMED else [CONTINUE[phase]]
        if phase == "request_body":
            if ex is None or ex.routed:
                return ex, []
            ex.chunks.append(message.request_body.body)
            ex.size = max(ex.size, sum(map(len, ex.chunks)))
            refused = self.picker.screen(ex.method, ex.path, ex.content_type, ex.size)
            if refused is not None:  # a body without a length that grows past the limit
                ex.routed, ex.chunks = True, []
                return ex, [immediate(refused)]
            if message.request_body.end_of_stream:
                return ex, self._route(ex, on_headers=False, deadline=deadline)
            # STREAMED: each chunk needs an answer; the pick happens at the end of stream.
            return ex, [] if ex.mode in (FULL_DUPLEX_STREAMED, BUFFERED) else [CONTINUE[phase]]
        if phase == "request_trailers":
            if ex is None or ex.routed:
                return ex, [CONTINUE[phase]]
            ex.after = (CONTINUE[phase],)
            return ex, self._route(ex, on_headers=False, deadline=deadline)
        if phase == "response_body" and ex is not None and ex.mode == FULL_DUPLEX_STREAMED:
            body = message.response_body
            return ex, [streamed_body(body.body, body.end_of_stream, request=False)]
        return ex, [CONTINUE[phase]] if phase in CONTINUE else []

    def _route(self, ex: _Exchange, *, on_headers: bool, deadline: float | None) -> list[pb.ProcessingResponse]:
        ex.body = b"".join(ex.chunks)
        ex.chunks = []
        ex.on_headers = on_headers
        decision = self.picker.route(ex.path, ex.body, ex.subset, headers=ex.flow_headers, deadline=deadline)
        if isinstance(decision, Waiting):
            ex.waiting = decision
            return []
        return self.decided(ex, decision)

    def decided(self, ex: _Exchange, decision: Decision) -> list[pb.ProcessingResponse]:
        """The answer to a request once it is routed or refused (at once, or after it waited)."""
        ex.routed, ex.waiting = True, None
        if isinstance(decision, Refused):
            return [immediate(decision), *ex.after]
        # BUFFERED (and STREAMED) at the end of the body: the headers are still held, so the body
        # answer may mutate them. FULL_DUPLEX_STREAMED: the held headers are answered now, then
        # the body goes back in chunks.
        full_duplex = ex.mode == FULL_DUPLEX_STREAMED
        answer = routed_response(decision, as_headers=ex.on_headers or full_duplex)
        if ex.on_headers or not full_duplex:
            return [answer, *ex.after]
        body = ex.body
        chunks = [body[i:i + BODY_CHUNK_BYTES] for i in range(0, len(body), BODY_CHUNK_BYTES)] or [b""]
        return [answer, *(streamed_body(chunk, i == len(chunks) - 1) for i, chunk in enumerate(chunks)), *ex.after]


class ExtProcStream:
    """One ext_proc stream on `disagg.epp.h2grpc`: serialized messages in and out; a request
    that waits in flow control is answered through the stream's Reply (the server binds one)."""

    def __init__(self, processor: ExternalProcessor) -> None:
        self.processor = processor
        self.ex: _Exchange | None = None
        self.reply: Reply | None = None

    def bind(self, reply: Reply) -> None:
        self.reply = reply

    @property
    def finished(self) -> bool:
        """Routed (or refused): the stream ends with OK right after the answer, and neither side
        spends another wakeup on it."""
        return self.ex is not None and self.ex.routed

    def message(self, payload: bytes) -> list[bytes] | Later:
        waited = self.ex is not None and self.ex.waiting is not None
        reply = self.reply
        try:
            self.ex, responses = self.processor.answer(self.ex, pb.ProcessingRequest.FromString(payload),
                                                       deadline=reply.deadline if reply is not None else None)
        except Exception as exc:  # a bug of ours: the client gets OpenAI's body, not Envoy's empty 500
            if isinstance(exc, DecodeError):
                raise
            log.exception("the EPP failed on a request")
            if self.ex is None:
                self.ex = _Exchange(mode=FULL_DUPLEX_STREAMED)
            self.ex.routed, self.ex.waiting = True, None
            return [immediate(Refused(500, error_body(500, f"internal error: {type(exc).__name__}"))).SerializeToString()]
        ex = self.ex
        if ex is None or ex.waiting is None or waited:
            return [r.SerializeToString() for r in responses]
        waiting = ex.waiting
        if reply is None:
            raise RuntimeError("a request waits for capacity on a stream that cannot be answered later")
        waiting.then(lambda decision: reply.send([r.SerializeToString() for r in self.processor.decided(ex, decision)]))
        reply.on_cancel(waiting.cancel)
        return LATER

    def end(self) -> list[bytes]:
        return []
