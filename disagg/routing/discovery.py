"""Where workers come from.

A `Discovery` yields full snapshots: every worker that exists and answered its descriptor
(`GET /v1/worker`). The scheduler makes its pool equal to each snapshot; liveness between
snapshots comes from scrapes. Sources here have no Ray imports: a static address list and a
Kubernetes pod watch (`disagg.routing.kubernetes`); the Ray registry lives in `deployments/`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Iterable, Protocol

import aiohttp
from pydantic import ValidationError

from disagg.messages import WorkerInfo

log = logging.getLogger(__name__)


class Discovery(Protocol):
    """Lifecycle: `watch()` is iterated once by `Scheduler.run`; each item replaces the pool's
    membership; the iterator runs until cancelled (or ends, leaving the pool as it is)."""

    def watch(self) -> AsyncIterator[list[WorkerInfo]]: ...


async def fetch_worker_info(session: aiohttp.ClientSession, address: str) -> WorkerInfo | None:
    """The worker's descriptor, or None when it does not answer with a valid one."""
    try:
        async with session.get(f"http://{address}/v1/worker") as response:
            if response.status != 200:
                raise ValueError(f"GET /v1/worker answered {response.status}")
            info = WorkerInfo.model_validate_json(await response.read())
    except (aiohttp.ClientError, TimeoutError, ValueError, ValidationError) as exc:
        log.debug("no descriptor from %s: %s", address, exc)
        return None
    if info.address != address:
        # The address we reached it at is the one that routes; keep the descriptor otherwise.
        info = info.model_copy(update={"address": address})
    return info


async def fetch_all(session: aiohttp.ClientSession, addresses: Iterable[str]) -> list[WorkerInfo]:
    infos = await asyncio.gather(*(fetch_worker_info(session, a) for a in addresses))
    return [i for i in infos if i is not None]


def parse_endpoints(text: str | Iterable[str]) -> list[str]:
    """`--endpoints host:port,host:port` (or a list of such strings) -> ["host:port", ...]."""
    parts = text.split(",") if isinstance(text, str) else [p for t in text for p in t.split(",")]
    out: list[str] = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        part = part.removeprefix("http://")
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"endpoint {part!r} is not host:port")
        out.append(part)
    return out


class StaticDiscovery:
    """A fixed list of worker addresses, asked for their descriptors: those not described yet
    every `interval_s`, the others in turn, at most `describes_per_s` a second (a restarted
    worker shows up with its new engine id when its turn comes: within `interval_s` for up to
    `describes_per_s x interval_s` workers; 1,000 workers are not each asked every second). A
    worker that does not answer keeps its last descriptor: whether it is alive is for its load
    signal to say."""

    def __init__(self, addresses: Iterable[str], *, interval_s: float = 1.0, timeout_s: float = 1.0,
                 describes_per_s: float = 20.0) -> None:
        self.addresses = parse_endpoints(list(addresses))
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.describes_per_s = describes_per_s

    async def watch(self) -> AsyncIterator[list[WorkerInfo]]:
        known: dict[str, WorkerInfo] = {}
        turn = 0  # where the next round of re-descriptions starts
        per_round = max(1, int(self.describes_per_s * self.interval_s))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as session:
            while True:
                described = [a for a in self.addresses if a in known]
                again = [described[(turn + i) % len(described)] for i in range(min(per_round, len(described)))]
                turn = (turn + len(again)) % max(len(described), 1)
                asked = [a for a in self.addresses if a not in known] + again
                for info in await fetch_all(session, asked):
                    known[info.address] = info
                yield list(known.values())
                await asyncio.sleep(self.interval_s)


class RouterPoolDiscovery:
    """The workers a running Router knows (its `/v1/pool`, as the Ray registry lists them), each
    described by its own endpoint: how a gateway follows a `disagg serve` stack. A worker is
    described once per engine (the Router's pool names the engine at each address); one that does
    not answer yet is asked again at the next poll, and stays out of the snapshot until then."""

    def __init__(self, router_url: str, *, interval_s: float = 0.5, timeout_s: float = 5.0) -> None:
        self.router_url = router_url
        self.interval_s = interval_s
        self.timeout_s = timeout_s

    async def watch(self) -> AsyncIterator[list[WorkerInfo]]:
        known: dict[str, WorkerInfo] = {}  # address -> descriptor
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as session:
            while True:
                try:
                    async with session.get(f"{self.router_url}/v1/pool") as response:
                        response.raise_for_status()
                        pool = await response.json(content_type=None)
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    log.warning("the Router's pool at %s: %s", self.router_url, exc)
                    pool = None  # the router restarts; keep the last snapshot
                if pool is not None:
                    listed = {w["address"]: w.get("engine_id") for w in pool}
                    known = {a: i for a, i in known.items() if listed.get(a) == i.engine_id}
                    for info in await fetch_all(session, [a for a in listed if a not in known]):
                        known[info.address] = info
                    yield list(known.values())
                await asyncio.sleep(self.interval_s)


class FixedDiscovery:
    """Workers whose descriptors are already known (tests, or a caller that registers them):
    one snapshot, then nothing."""

    def __init__(self, infos: Iterable[WorkerInfo]) -> None:
        self.infos = list(infos)

    async def watch(self) -> AsyncIterator[list[WorkerInfo]]:
        yield list(self.infos)
        await asyncio.Event().wait()
