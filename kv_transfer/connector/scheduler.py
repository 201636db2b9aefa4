"""The connector's scheduler half (runs in vLLM's engine-core process, beside the scheduler).

Prefill side: when a `do_remote_decode` request finishes, keep its blocks (vLLM frees them once
the worker half reports the request in `finished_sending`), name a lease for them, and return
the kv_transfer_params a decode needs. Decode side: when a request arrives with
`do_remote_prefill`, claim its prompt tokens as external (loaded asynchronously), and once
vLLM allocated blocks, hand the worker half a `Load`. Requests that will not read (aborted,
rejected, fully cached locally) release the prefill's lease right away.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from kv_transfer.connector.messages import DisaggConnectorMetadata, DisaggHandshake, Hold, Load
from kv_transfer.connector.params import ConnectorSettings, RemotePrefill
from kv_transfer.control import ControlClient
from kv_transfer.messages import LeaseCheck

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


class SchedulerSide:
    def __init__(self, engine_id: str, settings: ConnectorSettings, block_size: int, layout: str) -> None:
        self.engine_id = engine_id
        self.settings = settings
        self.block_size = block_size
        self.layout = layout
        # Until the worker reports its bound address (handshake), assume the configured one.
        self.host, self.port = settings.host, settings.port
        # Lease generations only grow within an engine's life; engine ids differ across lives.
        self._generation = itertools.count(1)
        self._loads: list[Load] = []
        self._holds: list[Hold] = []
        self._releaser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-lease-release")

    def set_handshake(self, metadata: dict[int, Any]) -> None:
        for info in metadata.values():
            if isinstance(info, DisaggHandshake):
                self.host, self.port = info.host, info.port
                return

    # -- decode side --

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        remote = RemotePrefill.parse(request.kv_transfer_params)
        if remote is None or not self._usable(remote, request):
            return 0, False
        n = min(remote.remote_num_tokens or request.num_prompt_tokens, request.num_prompt_tokens)
        count = n - num_computed_tokens
        if count < self.settings.min_remote_tokens:
            return 0, False
        return count, True

    def _usable(self, remote: RemotePrefill, request: "Request") -> bool:
        if remote.layout != self.layout:
            log.warning("request %s: prefill KV layout %s differs from ours %s; prefilling locally",
                        request.request_id, remote.layout, self.layout)
            return False
        if remote.seconds_left() < self.settings.lease_margin_s:
            log.warning("request %s: the prefill's lease ends in %.2f s; prefilling locally",
                        request.request_id, remote.seconds_left())
            return False
        n = min(remote.remote_num_tokens or request.num_prompt_tokens, request.num_prompt_tokens)
        return len(remote.remote_block_ids) >= math.ceil(n / self.block_size)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        params = request.kv_transfer_params
        remote = RemotePrefill.parse(params)
        if remote is None:
            return
        assert params is not None
        params["do_remote_prefill"] = False  # one transfer per request, even if it is rescheduled
        if num_external_tokens <= 0:
            self.release(remote)  # nothing to read (local cache hit, or refused above)
            return
        all_ids = blocks.get_block_ids()[0]
        local_ids = blocks.get_unhashed_block_ids()
        skip = len(all_ids) - len(local_ids)  # blocks this decode already had cached
        remote_ids = remote.remote_block_ids[skip:skip + len(local_ids)]
        self._loads.append(Load(request.request_id, list(local_ids), list(remote_ids), remote))

    # -- prefill side --

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        params = request.kv_transfer_params
        if not params:
            return False, None
        if params.get("do_remote_prefill"):
            # A decode request that ended before it could read (aborted, or rejected by the
            # serving layer through notify_kv_transfer_request_rejected): free the prefill now.
            remote = RemotePrefill.parse(params)
            params["do_remote_prefill"] = False
            if remote is not None:
                self.release(remote)
            return False, None
        if not params.get("do_remote_decode"):
            return False, None
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED):
            return False, None  # aborted or errored: nothing to hand off
        num_tokens = request.num_computed_tokens
        ids = list(block_ids)[: math.ceil(num_tokens / self.block_size)]
        if not ids:
            return False, None
        generation = next(self._generation)
        lease_id = f"{self.engine_id}/{request.request_id}"
        expires_at = time.time() + self.settings.lease_s
        self._holds.append(Hold(request.request_id, lease_id, generation, expires_at))
        remote = RemotePrefill(remote_engine_id=self.engine_id, remote_request_id=request.request_id,
                               remote_block_ids=ids, remote_host=self.host, remote_port=self.port,
                               remote_num_tokens=num_tokens, lease_id=lease_id, lease_generation=generation,
                               lease_expires_at=expires_at, layout=self.layout)
        return True, remote.to_params()

    # -- both --

    def build_connector_meta(self) -> DisaggConnectorMetadata:
        meta = DisaggConnectorMetadata(loads=self._loads, holds=self._holds)
        self._loads, self._holds = [], []
        return meta

    def release(self, remote: RemotePrefill) -> None:
        """Acknowledge a prefill's lease without reading, off the scheduler's thread."""
        self._releaser.submit(_release, remote)

    def shutdown(self) -> None:
        self._releaser.shutdown(wait=False, cancel_futures=True)


def _release(remote: RemotePrefill) -> None:
    try:
        client = ControlClient(remote.remote_host, remote.remote_port, timeout_s=2.0)
    except Exception as e:
        log.info("could not release lease %s at %s:%s (its prefill is gone?): %s",
                 remote.lease_id, remote.remote_host, remote.remote_port, e)
        return
    try:
        check = LeaseCheck(lease_id=remote.lease_id, generation=remote.lease_generation, release=True, wait_s=2.0)
        client.call(check, timeout_s=5.0)
    except Exception as e:
        log.info("releasing lease %s failed: %s", remote.lease_id, e)
    finally:
        client.close()
