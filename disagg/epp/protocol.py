"""Names the GIE endpoint-picker protocol fixes (gateway-api-inference-extension,
docs/proposals/004-endpoint-picker-protocol) and llm-d's P/D header."""

from __future__ import annotations

from disagg.worker.protocol import PREFILLER_HEADER

# EPP -> proxy: the picked endpoint(s), "ip:port" or an ordered fallback list "ip:port,ip:port".
DESTINATION_HEADER = "x-gateway-destination-endpoint"
DESTINATION_NAMESPACE = "envoy.lb"  # dynamic metadata namespace, same key and value as the header
# proxy -> EPP: the endpoints the EPP must pick from (filter metadata, a list of "ip:port").
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
# proxy -> EPP on the response: the endpoint that served.
SERVED_KEY = "x-gateway-destination-endpoint-served"

# gRPC health services the EPP answers.
LIVENESS = "liveness"
READINESS = "readiness"
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
PROCESS_PATH = f"/{EXT_PROC_SERVICE}/Process"  # its one method, as a gRPC path

DEFAULT_GRPC_PORT = 9002
DEFAULT_HEALTH_PORT = 9003
DEFAULT_METRICS_PORT = 9090
DEFAULT_PEER_PORT = 9004  # ours: picks shared between replicas (disagg.routing.peers)

# Envoy's limit on one streamed body message is 64 KiB; llm-d sends 62,000-byte chunks.
BODY_CHUNK_BYTES = 62_000

__all__ = [
    "BODY_CHUNK_BYTES", "DEFAULT_GRPC_PORT", "DEFAULT_HEALTH_PORT", "DEFAULT_METRICS_PORT", "DEFAULT_PEER_PORT",
    "DESTINATION_HEADER", "DESTINATION_NAMESPACE", "EXT_PROC_SERVICE", "LIVENESS", "PREFILLER_HEADER", "PROCESS_PATH",
    "READINESS", "SERVED_KEY", "SUBSET_KEY", "SUBSET_NAMESPACE",
]
