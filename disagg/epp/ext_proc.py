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
Response phases, if Envoy is configured to send them, are passed through unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import grpc
import msgspec
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from disagg.epp.h2grpc import NativeMethod
from disagg.epp.picker import EndpointPicker, Refused, Routed
from disagg.epp.protocol import (BODY_CHUNK_BYTES, DESTINATION_HEADER, DESTINATION_NAMESPACE, EXT_PROC_SERVICE,
                                 PROCESS_PATH, SUBSET_KEY, SUBSET_NAMESPACE)

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
    body: bytearray = field(default_factory=bytearray)
    routed: bool = False


def _done(ex: _Exchange | None) -> bool:
    """Routed or refused: nothing more to say on this stream."""
    return ex is not None and ex.routed


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


def header_mutation(routed: Routed) -> pb.HeaderMutation:
    return pb.HeaderMutation(
        set_headers=[
            base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode()), append_action=_OVERWRITE)
            for k, v in routed.headers.items()
        ],
        remove_headers=routed.remove,
    )


def destination_metadata(routed: Routed) -> struct_pb2.Struct:
    metadata = struct_pb2.Struct()
    metadata.update({DESTINATION_NAMESPACE: {DESTINATION_HEADER: routed.destination}})
    return metadata


def immediate(refused: Refused) -> bytes:
    return _bytes(immediate_response=pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=refused.status),
        headers=pb.HeaderMutation(set_headers=[base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"),
            append_action=_OVERWRITE)]),
        body=msgspec.json.encode(refused.body),
        details=f"disagg_epp_{refused.status}",
    ))


def _bytes(**fields) -> bytes:
    """A ProcessingResponse with these fields, serialized."""
    return pb.ProcessingResponse(**fields).SerializeToString()


# The answers that never change: "go on" for each phase the EPP passes through.
_CONTINUE_REQUEST_HEADERS = _bytes(request_headers=pb.HeadersResponse())
_CONTINUE_REQUEST_BODY = _bytes(request_body=pb.BodyResponse())
_CONTINUE_REQUEST_TRAILERS = _bytes(request_trailers=pb.TrailersResponse())
_CONTINUE_RESPONSE_HEADERS = _bytes(response_headers=pb.HeadersResponse())
_CONTINUE_RESPONSE_BODY = _bytes(response_body=pb.BodyResponse())
_CONTINUE_RESPONSE_TRAILERS = _bytes(response_trailers=pb.TrailersResponse())


class ExternalProcessor:
    """The protocol (`answer`), served by grpcio (`grpc_handler`) or by `disagg.epp.h2grpc`
    (`stream`; its C engine runs `answer`'s rules itself and calls `route_answer` once per
    request: `native_method`). Answers are serialized once here, for every server: most are the
    same bytes request after request (kept), and the rest are one body echoed back (encoded by
    hand)."""

    def __init__(self, picker: EndpointPicker, *, default_body_mode: BodyMode = FULL_DUPLEX_STREAMED) -> None:
        self.picker = picker
        self.default_body_mode = default_body_mode
        self._responses: dict[tuple, bytes] = {}

    def grpc_handler(self) -> grpc.GenericRpcHandler:
        """The ExternalProcessor service for a grpcio server; its answers go out as they are."""
        process = grpc.stream_stream_rpc_method_handler(
            self.Process, request_deserializer=pb.ProcessingRequest.FromString, response_serializer=None)
        return grpc.method_handlers_generic_handler(EXT_PROC_SERVICE, {"Process": process})

    async def Process(self, request_iterator: AsyncIterator[pb.ProcessingRequest], context) -> None:  # noqa: N802
        # context.read()/write() rather than iterating and yielding: grpc.aio's async-generator
        # streaming costs more per message, and this hop sits in front of every request.
        ex: _Exchange | None = None
        while True:
            message = await context.read()
            if message is grpc.aio.EOF:
                return
            ex, responses = self.answer(ex, message)
            for response in responses:
                await context.write(response)
            if _done(ex):
                return  # the stream ends with OK (see ExtProcStream.finished)

    def stream(self) -> ExtProcStream:
        """A handler for one stream of `disagg.epp.h2grpc.GrpcServer`."""
        return ExtProcStream(self)

    def answer(self, ex: _Exchange | None, message: pb.ProcessingRequest) -> tuple[_Exchange | None, list[bytes]]:
        """What to send back for one message of a stream, and the stream's state after it."""
        phase = message.WhichOneof("request")
        if phase == "request_headers":
            mode = (message.protocol_config.request_body_mode
                    if message.HasField("protocol_config") else self.default_body_mode)
            ex = _Exchange(mode=mode, subset=read_subset(message.metadata_context))
            for h in message.request_headers.headers.headers:
                if h.key == ":path":  # a pseudo-header: among the first few
                    ex.path = header_value(h)
                    break
            if message.request_headers.end_of_stream:
                return ex, self._route(ex, phase="headers")
            if ex.mode != FULL_DUPLEX_STREAMED:
                return ex, [_CONTINUE_REQUEST_HEADERS]
            return ex, []
        if phase == "request_body":
            if ex is None:
                return ex, []
            ex.body.extend(message.request_body.body)
            if message.request_body.end_of_stream:
                return ex, self._route(ex, phase="body")
            if ex.mode not in (FULL_DUPLEX_STREAMED, BUFFERED):
                # STREAMED: each chunk needs an answer; the pick happens at the end of stream.
                return ex, [_CONTINUE_REQUEST_BODY]
            return ex, []
        if phase == "request_trailers":
            out = self._route(ex, phase="body") if ex is not None and not ex.routed else []
            return ex, [*out, _CONTINUE_REQUEST_TRAILERS]
        if phase == "response_headers":
            return ex, [_CONTINUE_RESPONSE_HEADERS]
        if phase == "response_body":
            body = message.response_body
            if ex is not None and ex.mode == FULL_DUPLEX_STREAMED:
                return ex, [streamed_body(RESPONSE_BODY, body.body, body.end_of_stream)]
            return ex, [_CONTINUE_RESPONSE_BODY]
        if phase == "response_trailers":
            return ex, [_CONTINUE_RESPONSE_TRAILERS]
        return ex, []

    def _route(self, ex: _Exchange, *, phase: str) -> list[bytes]:
        ex.routed = True
        body = bytes(ex.body)
        # BUFFERED (and STREAMED) at the end of the body: the headers are still held, so the body
        # answer may mutate them. FULL_DUPLEX_STREAMED: the held headers are answered now.
        answer, routed = self._answer(ex.path, body, ex.subset, phase == "headers" or ex.mode == FULL_DUPLEX_STREAMED)
        if not routed or phase == "headers" or ex.mode != FULL_DUPLEX_STREAMED:
            return [answer]
        chunks = [body[i:i + BODY_CHUNK_BYTES] for i in range(0, len(body), BODY_CHUNK_BYTES)] or [b""]
        return [answer, *(streamed_body(REQUEST_BODY, chunk, i == len(chunks) - 1) for i, chunk in enumerate(chunks))]

    def _answer(self, path: str, body: bytes, subset: list[str] | None, as_headers: bool) -> tuple[bytes, bool]:
        """Pick: the serialized answer (the routed header mutation in a `request_headers` or a
        `request_body` response, or the refusal), and whether it routed."""
        decision = self.picker.route(path, body, subset)
        if isinstance(decision, Refused):
            return immediate(decision), False
        return self._routed("request_headers" if as_headers else "request_body", decision), True

    def route_answer(self, path: str, body: bytes, metadata: bytes | None, as_headers: bool) -> tuple[bytes, bool]:
        """`_answer` for the C engine, which hands over the request's `metadata_context` as bytes."""
        subset = read_subset(base_pb2.Metadata.FromString(metadata)) if metadata else None
        return self._answer(path, body, subset, as_headers)

    def native_method(self) -> NativeMethod:
        """The Process method as `disagg.epp.h2grpc`'s C engine answers it: the same answers,
        one Python call (`route_answer`) per request."""
        return native_method(self.route_answer, self.default_body_mode)

    def _routed(self, phase: str, routed: Routed) -> bytes:
        """The response that sets the picked endpoints' headers and metadata. The same few
        endpoint lists come back pick after pick, so each response is built once and kept
        (never modified afterwards): building one costs more than the pick."""
        key = (phase, tuple(routed.headers.items()), tuple(routed.remove))
        response = self._responses.get(key)
        if response is None:
            common = pb.CommonResponse(header_mutation=header_mutation(routed), clear_route_cache=True)
            answer = pb.HeadersResponse(response=common) if phase == "request_headers" else pb.BodyResponse(response=common)
            response = _bytes(**{phase: answer}, dynamic_metadata=destination_metadata(routed))
            if len(self._responses) >= 4096:
                self._responses.clear()
            self._responses[key] = response
        return response


def native_method(route: Callable[[str, bytes, bytes | None, bool], tuple[bytes, bool]],
                  default_body_mode: BodyMode = FULL_DUPLEX_STREAMED) -> NativeMethod:
    """The Process method for the C engine, around `route` (`ExternalProcessor.route_answer`)."""
    return NativeMethod(
        path=PROCESS_PATH, route=route, parse=pb.ProcessingRequest.FromString, default_mode=default_body_mode,
        continues=(_CONTINUE_REQUEST_HEADERS, _CONTINUE_REQUEST_BODY, _CONTINUE_REQUEST_TRAILERS,
                   _CONTINUE_RESPONSE_HEADERS, _CONTINUE_RESPONSE_BODY, _CONTINUE_RESPONSE_TRAILERS),
        body_chunk=BODY_CHUNK_BYTES, body_fields=(REQUEST_BODY, RESPONSE_BODY, *_STREAMED_PATH, _BODY))


class ExtProcStream:
    """One ext_proc stream on `disagg.epp.h2grpc`: serialized messages in and out."""

    def __init__(self, processor: ExternalProcessor) -> None:
        self.processor = processor
        self.ex: _Exchange | None = None

    @property
    def finished(self) -> bool:
        """Routed (or refused): the EPP has said all it will, so the stream ends with OK right
        after the answer. Envoy then skips the rest of this request's ext_proc phases, which the
        EPP would pass through unchanged anyway, and neither side spends another wakeup (Envoy's
        reset of the stream once the HTTP request is done) on it."""
        return _done(self.ex)

    def message(self, payload: bytes) -> list[bytes]:
        self.ex, responses = self.processor.answer(self.ex, pb.ProcessingRequest.FromString(payload))
        return responses

    def end(self) -> list[bytes]:
        return []


def _number(message: type, name: str) -> int:
    return message.DESCRIPTOR.fields_by_name[name].number


REQUEST_BODY = _number(pb.ProcessingResponse, "request_body")
RESPONSE_BODY = _number(pb.ProcessingResponse, "response_body")
# The path from a BodyResponse down to the StreamedBodyResponse, outermost first.
_STREAMED_PATH = (_number(pb.BodyResponse, "response"), _number(pb.CommonResponse, "body_mutation"),
                  _number(pb.BodyMutation, "streamed_response"))
_BODY = _number(pb.StreamedBodyResponse, "body")
_END_OF_STREAM_TRUE = bytes([_number(pb.StreamedBodyResponse, "end_of_stream") << 3, 1])  # varint field = 1


_ONE_BYTE = [bytes([n]) for n in range(0x80)]


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _ONE_BYTE[n]
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _nested(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def streamed_body(phase_field: int, chunk: bytes, end_of_stream: bool) -> bytes:
    """The serialized ProcessingResponse that hands a body chunk back to Envoy (FULL_DUPLEX_
    STREAMED): field `phase_field` (REQUEST_BODY or RESPONSE_BODY) {response {body_mutation
    {streamed_response {body, end_of_stream}}}}.
    Written by hand, byte for byte what protobuf writes (a test holds it to that): the message
    objects cost more than the pick."""
    out = (_nested(_BODY, chunk) if chunk else b"") + (_END_OF_STREAM_TRUE if end_of_stream else b"")
    for number in reversed(_STREAMED_PATH):
        out = _nested(number, out)
    return _nested(phase_field, out)
