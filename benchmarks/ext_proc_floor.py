"""The floor of the ext_proc hop for our EPP: Envoy in front of one worker, its ext_proc filter
configured as the gateway's (plaintext), calling a server on our HTTP/2 gRPC stack that routes
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
from disagg.epp.ext_proc import streamed_body
from disagg.epp.h2grpc import GrpcServer
from disagg.epp.protocol import DESTINATION_HEADER, DESTINATION_NAMESPACE, PROCESS_PATH


def routed_headers(worker: str) -> bytes:
    """The serialized headers answer that sends a request to `worker` (header and metadata)."""
    metadata = struct_pb2.Struct()
    metadata.update({DESTINATION_NAMESPACE: {DESTINATION_HEADER: worker}})
    mutation = pb.HeaderMutation(set_headers=[base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=DESTINATION_HEADER, raw_value=worker.encode()))])
    return pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(response=pb.CommonResponse(header_mutation=mutation, clear_route_cache=True)),
        dynamic_metadata=metadata,
    ).SerializeToString()


class ConstantAnswer:
    """One FULL_DUPLEX_STREAMED stream: at the body's end, the fixed headers answer and the body
    echoed back in one chunk, as the EPP writes them; then the stream ends (as the EPP's do)."""

    def __init__(self, headers_answer: bytes) -> None:
        self.headers_answer = headers_answer
        self.body = bytearray()
        self.finished = False

    def message(self, payload: bytes) -> list[bytes]:
        request = pb.ProcessingRequest.FromString(payload)
        if request.WhichOneof("request") != "request_body":
            return []
        self.body += request.request_body.body
        if not request.request_body.end_of_stream:
            return []
        self.finished = True
        return [self.headers_answer, streamed_body(bytes(self.body), True).SerializeToString()]

    def end(self) -> list[bytes]:
        return []


def constant_server(worker: str) -> GrpcServer:
    """A server routing every request to `worker` (the answer built once)."""
    answer = routed_headers(worker)
    return GrpcServer({PROCESS_PATH: lambda: ConstantAnswer(answer)})


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
