"""`disagg serve`: the whole stack on a local Ray (router + prefill + decode), ready to curl."""

from __future__ import annotations

import argparse
import asyncio
import logging

from disagg.config import (CONFIG_ERRORS, AppConfig, CommandLineParser, check_model_dir, config_error, port_number,
                           usage_error)
from disagg.epp.replicas import ReplicaPorts
from disagg.routing.discovery import RouterPoolDiscovery


PROG = "disagg serve"
# The flags that set config fields, to name them in a config error.
FLAGS = {"model": "--model", "port": "--port", "host": "--host", "kv_connector": "--kv-connector",
         "prefill.replicas": "--prefill-replicas", "decode.replicas": "--decode-replicas",
         "routing.pd_threshold_tokens": "--pd-threshold"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = CommandLineParser(prog=PROG, description=__doc__)
    p.add_argument("--config", help="AppConfig YAML file")
    p.add_argument("--model", help="model directory (e.g. models/tiny from `disagg model tiny`)")
    p.add_argument("--port", type=port_number, help="OpenAI API port (default 8000)")
    p.add_argument("--host", help="address to serve on (default 127.0.0.1)")
    p.add_argument("--prefill-replicas", type=int)
    p.add_argument("--decode-replicas", type=int)
    p.add_argument("--kv-connector", choices=["disagg", "nixl", "none"])
    p.add_argument("--pd-threshold", type=int, help="routing.pd_threshold_tokens")
    p.add_argument("--dashboard-port", type=port_number, default=0,
                   help="Ray dashboard port (default: 8265, or the next free one when taken)")
    p.add_argument("--gateway", action="store_true", help="also start the EPP and Envoy in front of the workers")
    p.add_argument("--gateway-port", type=port_number, default=8080)
    p.add_argument("--epp-replicas", type=int, default=1,
                   help="picker replicas behind the gateway (active-active; replica i on the EPP ports + 100*i)")
    p.add_argument("--epp-ports", type=_ports, default=ReplicaPorts(), metavar="GRPC,HEALTH,METRICS,PEER",
                   help="replica 0's ports with --epp-replicas > 1 (default 9002,9003,9090,9004)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any AppConfig field, dotted for nested ones: --set decode.cpu_bind=[1]")
    return p.parse_args(argv)


def _ports(text: str) -> ReplicaPorts:
    try:
        return ReplicaPorts(*(int(p) for p in text.split(",")))
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected four ports GRPC,HEALTH,METRICS,PEER, got {text!r}") from None


def config_from_args(args: argparse.Namespace) -> AppConfig:
    overrides = {
        "model": args.model, "port": args.port, "host": args.host, "kv_connector": args.kv_connector,
        "prefill.replicas": args.prefill_replicas, "decode.replicas": args.decode_replicas,
        "routing.pd_threshold_tokens": args.pd_threshold,
    }
    return AppConfig.load(args.config, overrides, args.set)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        config = config_from_args(args)
        check_model_dir(config.model)
        if config.decode.replicas < 1:
            raise ValueError("decode.replicas: at least 1 decode replica is needed")
        if args.epp_replicas < 1:
            raise ValueError("--epp-replicas: at least 1")
    except CONFIG_ERRORS as e:
        return usage_error(PROG, config_error(e, FLAGS))
    from deployments.local import serve_forever, start_local

    print(f"starting disagg: model {config.model}, {config.prefill.replicas} prefill + "
          f"{config.decode.replicas} decode, connector {config.kv_connector}", flush=True)
    stack = start_local(config, dashboard_port=args.dashboard_port)
    gateway = None
    if args.gateway and args.epp_replicas > 1:
        from disagg.epp.gateway import GatewayThread
        from disagg.epp.replicas import EppReplicas

        gateway = GatewayThread(EppReplicas(config, ["--router-url", stack.url], args.epp_replicas,
                                            gateway_port=args.gateway_port, gateway_host=config.host,
                                            base=args.epp_ports))
        gateway.run(gateway.gateway.start(), 120)
    elif args.gateway:
        from disagg.epp.gateway import start_gateway_thread

        gateway = start_gateway_thread(config, RouterPoolDiscovery(stack.url), gateway_port=args.gateway_port,
                                       host=config.host)
    print(f"ready: {stack.url}/v1 (model {config.model_name}); Ray dashboard {stack.dashboard_url}; "
          f"Ray metrics {stack.metrics_url}", flush=True)
    if gateway is not None:
        print(f"gateway: {gateway.url}", flush=True)
    try:
        serve_forever(stack)
    finally:
        if gateway is not None:
            gateway.stop()
    return 0
