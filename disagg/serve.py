"""`disagg serve`: the whole stack on a local Ray (router + prefill + decode), ready to curl.

Two processes: `disagg serve` itself supervises the driver, a child in its own session that runs
Ray, Serve and the gateway (`disagg.children.supervise`). A Ctrl-C or SIGTERM, to the process or
to its group, reaches only the supervisor (Ray's processes in the driver's group never see it,
nor print their stack dumps); it asks the driver to stop (gateway, Serve, Ray, in that order)
and, whatever happened to the driver, ends every process the stack started and removes the
stack's temporary directory (TMPDIR of every process of the stack) within 30 s, then says so.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import tempfile

from disagg.config import (CONFIG_ERRORS, AppConfig, CommandLineParser, check_model_dir, config_error, is_loopback,
                           port_number, usage_error)
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


# Set in the driver's environment by the supervisor.
DRIVER_ENV = "DISAGG_SERVE_DRIVER"
RUNTIME_DIR_ENV = "DISAGG_SERVE_RUNTIME_DIR"
STOPPED_CLEANLY = "disagg stopped cleanly: every process it started has ended, its temporary files are removed"
# The driver's stop gets this long before the supervisor ends what is left (which takes ~5 s).
STOP_S = 22.0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
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
    if os.environ.get(DRIVER_ENV) == "1":
        return drive(args, config)
    return supervise_driver(argv, config)


def driver_environment(config: AppConfig, runtime_dir: str) -> dict[str, str]:
    env = dict(os.environ, **{DRIVER_ENV: "1", RUNTIME_DIR_ENV: runtime_dir, "TMPDIR": runtime_dir})
    if is_loopback(config.host):
        # Ray's switch for a cluster of this machine alone: its node address is then loopback,
        # and every server of Ray's (GCS, raylet, object manager, workers, agents) listens there.
        # It is read when Ray is imported, hence here.
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def supervise_driver(argv: list[str], config: AppConfig) -> int:
    from disagg.children import supervise

    runtime_dir = tempfile.mkdtemp(prefix="disagg-")
    cmd = [sys.executable, "-m", "disagg.cli", "serve", *argv]
    result = supervise(cmd, env=driver_environment(config, runtime_dir), remove=[runtime_dir], stop_s=STOP_S)
    if result.returncode < 0 and not result.stop_requested:
        print(f"disagg serve: the driver died of {signal.Signals(-result.returncode).name}", file=sys.stderr,
              flush=True)
    if result.left or os.path.exists(runtime_dir):
        print(f"disagg stopped, but left behind: processes {[p.pid for p in result.left]}"
              f"{', ' + runtime_dir if os.path.exists(runtime_dir) else ''}", flush=True)
        return 1
    print(STOPPED_CLEANLY, flush=True)
    return 0 if result.returncode == 0 or (result.stop_requested and result.returncode < 0) else 1


def drive(args: argparse.Namespace, config: AppConfig) -> int:
    """The driver: start the stack, serve until SIGTERM, stop it in order."""
    from deployments.local import StartFailed, StopRequested, start_local, stop_local, stop_on_signals, wait_for_stop

    stop_on_signals()  # a stop during the start is a stop too
    supervisor = os.getppid()
    print(f"starting disagg: model {config.model}, {config.prefill.replicas} prefill + "
          f"{config.decode.replicas} decode, connector {config.kv_connector}", flush=True)
    gateway = None
    failure = None
    runtime_dir = os.environ.get(RUNTIME_DIR_ENV)
    try:
        # Ray's session directory right in the runtime directory: its socket paths must stay short.
        stack = start_local(config, dashboard_port=args.dashboard_port, ray_tmpdir=runtime_dir)
        gateway = _start_gateway(args, config, stack.url)
        print(f"ready: {stack.url}/v1 (model {config.model_name}); Ray dashboard {stack.dashboard_url}; "
              f"Ray metrics {stack.metrics_url}", flush=True)
        if gateway is not None:
            print(f"gateway: {gateway.url}", flush=True)
        wait_for_stop()
    except StopRequested:
        pass
    except StartFailed as e:
        failure = str(e)
        print(f"disagg serve: a replica failed to start:\n{failure}", file=sys.stderr, flush=True)
    except Exception as e:  # noqa: BLE001 - reported, then everything is stopped
        failure = f"{type(e).__name__}: {e}"
        logging.getLogger(PROG).exception("disagg serve failed")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # the supervisor ends what a stop leaves
    print("shutting down...", flush=True)
    if gateway is not None:
        gateway.stop()  # first: the gateway's port is free at once
    left = stop_local(remove=[runtime_dir] if runtime_dir else [])
    if os.getppid() != supervisor:  # the supervisor was killed: nobody else will say it
        print(f"disagg stopped, but processes {left} would not end" if left else STOPPED_CLEANLY, flush=True)
    if failure is not None:
        print(f"disagg serve: failed: {failure_summary(failure)}", file=sys.stderr, flush=True)
        return 1
    return 0


_EXCEPTION_LINE = re.compile(r"^[\w.]+(Error|Exception|Exit)\b.*:")


def failure_summary(failure: str, limit: int = 600) -> str:
    """A failure's traceback in one line: its last exception and the lines that explain it."""
    lines = [line.strip() for line in failure.strip().splitlines() if line.strip()]
    last = max((i for i, line in enumerate(lines) if _EXCEPTION_LINE.match(line)), default=len(lines) - 1)
    detail = [line for line in lines[last:last + 4] if not line.startswith("For further information")]
    return " ".join(detail)[:limit] or failure[:limit]


def _start_gateway(args: argparse.Namespace, config: AppConfig, router_url: str):
    if args.gateway and args.epp_replicas > 1:
        from disagg.epp.gateway import GatewayThread
        from disagg.epp.replicas import EppReplicas

        gateway = GatewayThread(EppReplicas(config, ["--router-url", router_url], args.epp_replicas,
                                            gateway_port=args.gateway_port, gateway_host=config.host,
                                            base=args.epp_ports))
        gateway.run(gateway.gateway.start(), 120)
        return gateway
    if args.gateway:
        from disagg.epp.gateway import start_gateway_thread

        return start_gateway_thread(config, RouterPoolDiscovery(router_url), gateway_port=args.gateway_port,
                                    host=config.host)
    return None
