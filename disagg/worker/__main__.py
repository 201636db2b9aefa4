"""`disagg worker` / `python -m disagg.worker`: one standalone worker (the gateway path, k8s pods
without Ray, tests). Prefill workers decode may call come from --prefill-endpoints."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from disagg.config import (CONFIG_ERRORS, AppConfig, CommandLineParser, check_model_dir, config_error, cpu_list,
                           host_ports, port_number, usage_error)

PROG = "disagg worker"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = CommandLineParser(prog=PROG, description=__doc__)
    p.add_argument("--role", choices=["prefill", "decode"], required=True)
    p.add_argument("--config", help="AppConfig YAML")
    p.add_argument("--model", help="model directory (overrides the config)")
    p.add_argument("--host")
    p.add_argument("--port", type=port_number, default=0, help="HTTP port (0: a free one, printed on start)")
    p.add_argument("--cpu-bind", type=cpu_list, help="cores for the engine's threads, e.g. 0 or 0-3")
    p.add_argument("--prefill-endpoints", type=host_ports, default="",
                   help="host:port,... of prefill workers decode may call")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any AppConfig field, e.g. block_size=64 or routing.kv_events=false")
    return p.parse_args(argv)


def load_config(args: argparse.Namespace) -> AppConfig:
    return AppConfig.load(args.config, {"model": args.model, "host": args.host}, args.set)


async def run(args: argparse.Namespace, config: AppConfig) -> None:
    from disagg.worker.launch import start_worker

    running = await start_worker(config, args.role, port=args.port, cpu_bind=args.cpu_bind)
    running.worker.known_prefill.update(a for a in args.prefill_endpoints.split(",") if a)
    print(f"READY {args.role} http://{running.address} engine={running.worker.info.engine_id}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.stop()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        config = load_config(args)
        check_model_dir(config.model)
    except CONFIG_ERRORS as e:
        return usage_error(PROG, config_error(e, {"model": "--model", "host": "--host"}))
    asyncio.run(run(args, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
