"""`disagg epp`: the endpoint picker as its own process (a Kubernetes EPP Deployment, or beside a
gateway), optionally with an Envoy in front of the workers (`--gateway-port`).

Workers come from `--endpoints host:port,...` (each asked for `GET /v1/worker`), from a running
Router (`--router-url`, its `/v1/pool`) or from a Kubernetes pod watch (`--k8s-selector`).

Replicas run active-active: each publishes its picks on `--peer-port` and follows its peers'
(`--peers tcp://host:port,...`, a `--peers-file` re-read when it changes, or the EPP's own pods,
`--k8s-peer-selector`); see `disagg.routing.peers`."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import signal
import socket
import sys
from pathlib import Path

from disagg.config import (CONFIG_ERRORS, AppConfig, CommandLineParser, config_error, host_name, host_ports,
                           port_number, positive_seconds, usage_error)
from disagg.heap import freeze_startup_heap
from disagg.epp.envoy import BODY_MODES
from disagg.epp.protocol import DEFAULT_GRPC_PORT, DEFAULT_HEALTH_PORT, DEFAULT_METRICS_PORT, DEFAULT_PEER_PORT
from disagg.routing import Discovery, StaticDiscovery
from disagg.routing.discovery import RouterPoolDiscovery
from disagg.routing.peers import PeerDiscovery, PeersFile, StaticPeers


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = CommandLineParser(prog="disagg epp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="AppConfig YAML (model, block_size, routing...)")
    p.add_argument("--model", help="model directory (overrides the config); its tokenizer is used when present")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any AppConfig field, e.g. routing.pd_threshold_tokens=512")
    p.add_argument("--endpoints", type=host_ports, default="", help="static worker list host:port,host:port")
    p.add_argument("--discovery-interval", type=positive_seconds, default=1.0, help="seconds between descriptor polls")
    p.add_argument("--router-url", help="follow the workers a running Router lists (its /v1/pool) instead of --endpoints")
    p.add_argument("--k8s-selector", help="watch pods with this label selector instead of --endpoints")
    p.add_argument("--k8s-namespace", default=None, help="namespace to watch (default: the pod's own)")
    p.add_argument("--k8s-port", type=port_number, default=8000, help="the workers' HTTP port in their pods")
    p.add_argument("--k8s-role-label", default="disagg.io/role", help="pod label naming the role")
    p.add_argument("--host", type=host_name, default="0.0.0.0", help="address the EPP's servers bind")
    p.add_argument("--grpc-port", type=port_number, default=DEFAULT_GRPC_PORT)
    p.add_argument("--health-port", type=port_number, default=DEFAULT_HEALTH_PORT)
    p.add_argument("--metrics-port", type=port_number, default=DEFAULT_METRICS_PORT)
    p.add_argument("--gateway-port", type=port_number, default=None,
                   help="also run Envoy listening on this port (0: a free one) in front of the workers")
    p.add_argument("--gateway-host", type=host_name, default=None, help="Envoy's listen address (default: the config's host)")
    p.add_argument("--gateway-body-mode", choices=BODY_MODES, default=BODY_MODES[0],
                   help="how that Envoy sends request bodies to the EPP (default: %(default)s)")
    p.add_argument("--eds-dir", default=None,
                   help="keep an Envoy EDS file of the decode endpoints in this directory (for an external Envoy)")
    p.add_argument("--secure-serving", type=_flag, nargs="?", const=True, default=True, metavar="BOOL",
                   help="serve ext_proc over TLS (default true; --secure-serving=false: plaintext h2c)")
    p.add_argument("--cert-path", type=Path, default=None,
                   help="directory with tls.crt and tls.key (default: a self-signed certificate made at start)")
    p.add_argument("--peer-port", type=port_number, default=DEFAULT_PEER_PORT,
                   help="where this replica publishes its picks to its peers (0: a free port)")
    p.add_argument("--peers", default="", help="peer replicas' pick endpoints, tcp://host:port,...")
    p.add_argument("--peers-file", type=Path, help="a file listing the peers' pick endpoints, one per line")
    p.add_argument("--k8s-peer-selector", help="the peers are the ready pods with this label selector")
    p.add_argument("--replica-id", help="this replica's name among its peers (default: host name and gRPC port)")
    p.add_argument("--log-level", default="INFO", type=str.upper,
                   choices=["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"])
    args = p.parse_args(argv)
    if not args.endpoints and not args.k8s_selector and not args.router_url:
        p.error("give --endpoints host:port,..., --router-url or --k8s-selector")
    return args


def _flag(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def make_peers(args: argparse.Namespace) -> PeerDiscovery | None:
    if args.k8s_peer_selector:
        from disagg.routing.kubernetes import KubernetesPeers

        return KubernetesPeers(args.k8s_peer_selector, namespace=args.k8s_namespace, port=args.peer_port)
    if args.peers_file:
        return PeersFile(args.peers_file)
    if args.peers:
        return StaticPeers([p.strip() for p in args.peers.split(",") if p.strip()])
    return None


def make_discovery(args: argparse.Namespace) -> Discovery:
    if args.router_url:
        return RouterPoolDiscovery(args.router_url)
    if args.k8s_selector:
        from disagg.routing.kubernetes import KubernetesDiscovery

        return KubernetesDiscovery(args.k8s_selector, namespace=args.k8s_namespace, port=args.k8s_port,
                                   role_label=args.k8s_role_label)
    if not args.endpoints:
        raise SystemExit("disagg epp: give --endpoints host:port,... or --k8s-selector")
    return StaticDiscovery(args.endpoints.split(","), interval_s=args.discovery_interval)


async def run_epp(args: argparse.Namespace) -> None:
    from disagg.epp.gateway import start_gateway

    config = AppConfig.load(args.config, {"model": args.model}, args.set)
    gateway = await start_gateway(
        config, make_discovery(args), gateway_port=args.gateway_port, host=args.gateway_host,
        epp_host=args.host, grpc_port=args.grpc_port, health_port=args.health_port,
        metrics_port=args.metrics_port, eds_dir=Path(args.eds_dir) if args.eds_dir else None,
        secure_serving=args.secure_serving, cert_path=args.cert_path,
        peers=make_peers(args), peer_port=args.peer_port,
        replica_id=args.replica_id or f"{socket.gethostname()}:{args.grpc_port}",
        body_mode=args.gateway_body_mode,
    )
    epp = gateway.epp
    freeze_startup_heap()
    line = (f"READY epp grpc={epp.host}:{epp.grpc_port} tls={'true' if epp.cert_file else 'false'} "
            f"health={epp.health_port} metrics={epp.metrics_port}")
    if gateway.peer_sync is not None:
        line += f" peer={gateway.peer_sync.endpoint}"
    if gateway.url:
        line += f" gateway={gateway.url}"
    print(line, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await gateway.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # a config that does not load: one line, before anything starts (run_epp loads it again)
        AppConfig.load(args.config, {"model": args.model}, args.set)
    except CONFIG_ERRORS as e:
        return usage_error("disagg epp", config_error(e, {"model": "--model"}))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # `kill -USR1` writes every thread's stack to stderr: what a picker that does not get ready waits on.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    asyncio.run(run_epp(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
