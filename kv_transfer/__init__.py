"""A NIXL-compatible KV transfer layer over UCX; runs without Ray or vLLM.

`Agent` is the entry point (NIXL's vocabulary: register memory, exchange metadata, READ/WRITE
with notifications, poll, release), over the `nixl`, `ucxx` or `tcp` backend. The vLLM KV
connector built on it is `kv_transfer.vllm_connector.DisaggConnector` (imported on its own so
this package never pulls in vLLM).
"""

from kv_transfer.agent import Agent, Registration, XferHandle
from kv_transfer.backends import XferState, available_backends
from kv_transfer.descriptors import Desc, DescList
from kv_transfer.errors import AccessError, LayoutMismatch, LeaseError, PeerError, TransferError
from kv_transfer.layout import KVLayout
from kv_transfer.lease import Lease, LeaseStatus, LeaseToken

__all__ = ["AccessError", "Agent", "Desc", "DescList", "KVLayout", "LayoutMismatch", "Lease", "LeaseError",
           "LeaseStatus", "LeaseToken", "PeerError", "Registration", "TransferError", "XferHandle", "XferState",
           "available_backends"]
