"""The floor of the ext_proc hop for our EPP: Envoy in front of one worker, its ext_proc filter
configured as the gateway's (plaintext, the same body mode), calling a server on our HTTP/2 gRPC stack that routes
every request to that worker with a constant answer (no reading of the body, no pick, no state).

`disagg bench epp` measures it beside the real EPP: the difference is what the EPP's own work
costs; the floor itself is Envoy's ext_proc machinery plus what any Python server on this
machine spends per stream.

    python -m benchmarks.ext_proc_floor WORKER_HOST:PORT   # from a checkout; prints "READY gateway=http://..."
"""

from __future__ import annotations

import asyncio
import signal
import sys
import tempfile
from pathlib import Path

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from disagg.epp.envoy import EnvoyProcess, EnvoySettings, write_endpoints
from disagg.epp.ext_proc import BUFFERED, streamed_body
from disagg.epp.h2grpc import GrpcServer
from disagg.epp.protocol import DESTINATION_HEADER, DESTINATION_NAMESPACE, PROCESS_PATH


def routed(worker: str, *, as_headers: bool) -> bytes:
    """The serialized answer that sends a request to `worker` (header and metadata), in the
    headers answer (FULL_DUPLEX_STREAMED) or the body answer (BUFFERED)."""
    metadata = struct_pb2.Struct()
    metadata.update({DESTINATION_NAMESPACE: {DESTINATION_HEADER: worker}})
    mutation = pb.HeaderMutation(set_headers=[base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=DESTINATION_HEADER, raw_value=worker.encode()))])
    common = pb.CommonResponse(header_mutation=mutation, clear_route_cache=True)
    if as_headers:
        return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common),
                                     dynamic_metadata=metadata).SerializeToString()
    return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common),
                                 dynamic_metadata=metadata).SerializeToString()


_CONTINUE_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse()).SerializeToString()


class ConstantAnswer:
    """One stream in the body mode Envoy names on its first message, answered as the EPP does:
    BUFFERED, the headers at once and the fixed routing answer to the body; FULL_DUPLEX_STREAMED,
    at the body's end the fixed headers answer and the body echoed back in one chunk. Then the
    stream ends (as the EPP's do)."""

    def __init__(self, answers: dict[bool, bytes]) -> None:
        self.answers = answers
        self.buffered = False
        self.body = bytearray()
        self.finished = False

    def message(self, payload: bytes) -> list[bytes]:
        request = pb.ProcessingRequest.FromString(payload)
        phase = request.WhichOneof("request")
        if phase == "request_headers":
            self.buffered = request.protocol_config.request_body_mode == BUFFERED
            return [_CONTINUE_HEADERS] if self.buffered else []
        if phase != "request_body":
            return []
        self.body += request.request_body.body
        if not request.request_body.end_of_stream:
            return []
        self.finished = True
        if self.buffered:
            return [self.answers[False]]
        return [self.answers[True], streamed_body(bytes(self.body), True).SerializeToString()]

    def end(self) -> list[bytes]:
        return []


def constant_server(worker: str) -> GrpcServer:
    """A server routing every request to `worker` (the answer built once)."""
    answers = {as_headers: routed(worker, as_headers=as_headers) for as_headers in (True, False)}
    return GrpcServer({PROCESS_PATH: lambda: ConstantAnswer(answers)})


async def serve(worker: str) -> None:
    server = constant_server(worker)
    grpc_port = await server.listen("127.0.0.1", 0)
    eds_dir = Path(tempfile.mkdtemp(prefix="disagg-ext-proc-floor-"))
    write_endpoints(eds_dir, [worker])
    envoy = EnvoyProcess(EnvoySettings("127.0.0.1", 0, "127.0.0.1", grpc_port, eds_dir))
    await envoy.start()
    print(f"READY gateway={envoy.url}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await envoy.stop()
        await server.stop()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))
