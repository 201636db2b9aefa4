"""The EPP with its ext_proc served by grpclib (asyncio gRPC over hyper-h2) instead of our own
HTTP/2 server, behind an Envoy in front of the workers: what `disagg bench epp` measures our
server against. The same scheduler, picker and ext_proc rules as `disagg epp`; plaintext on both
sides of the comparison, so the difference is the server.

    python -m benchmarks.ext_proc_grpclib WORKER_HOST:PORT --model NAME --block-size N
    # from a checkout; prints "READY gateway=http://..."
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import tempfile
from pathlib import Path
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from grpclib.const import Cardinality, Handler
from grpclib.encoding.proto import ProtoCodec
from grpclib.server import Server, Stream

from disagg.config import RoutingConfig
from disagg.epp.envoy import EnvoyProcess, EnvoySettings, write_endpoints
from disagg.epp.ext_proc import ExternalProcessor
from disagg.epp.picker import EndpointPicker
from disagg.epp.prompt import RawPromptReader
from disagg.epp.protocol import PROCESS_PATH
from disagg.routing import Scheduler, StaticDiscovery


class ExtProcService:
    """ExternalProcessor/Process on grpclib: `ExternalProcessor.answer` for each message."""

    def __init__(self, processor: ExternalProcessor) -> None:
        self.processor = processor

    async def process(self, stream: Stream) -> None:
        ex = None
        while (message := await stream.recv_message()) is not None:
            ex, responses = self.processor.answer(ex, message)
            for response in responses:
                await stream.send_message(response)
            if ex is not None and ex.routed:
                return  # ends with OK, as our server's streams do

    def __mapping__(self) -> dict[str, Any]:
        return {PROCESS_PATH: Handler(self.process, Cardinality.STREAM_STREAM, pb.ProcessingRequest,
                                      pb.ProcessingResponse)}


async def serve(worker: str, model: str, block_size: int) -> None:
    scheduler = Scheduler(RoutingConfig(), model=model, block_size=block_size)
    follow = asyncio.create_task(scheduler.run(StaticDiscovery([worker])))
    server = Server([ExtProcService(ExternalProcessor(EndpointPicker(scheduler, RawPromptReader(model))))],
                    codec=ProtoCodec())
    await server.start("127.0.0.1", 0)
    grpc_port = server._server.sockets[0].getsockname()[1]  # grpclib binds port 0 but does not say which
    eds_dir = Path(tempfile.mkdtemp(prefix="disagg-ext-proc-grpclib-"))
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
        server.close()
        await server.wait_closed()
        follow.cancel()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("worker")
    p.add_argument("--model", required=True)
    p.add_argument("--block-size", type=int, required=True)
    args = p.parse_args()
    asyncio.run(serve(args.worker, args.model, args.block_size))
