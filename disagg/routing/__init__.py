"""Routing: which prefill/decode pair serves a request (no Ray imports).

    scheduler = Scheduler(config.routing, model=config.model_name, block_size=config.block_size)
    task = asyncio.create_task(scheduler.run(StaticDiscovery(["10.0.0.1:8001", "10.0.0.2:8001"])))
    pick = scheduler.pick(PickRequest(model=..., prompt_token_ids=[...]))
    pick.decode[0].address, pick.prefill  # [] means decode prefills locally
"""

from disagg.routing.discovery import Discovery, FixedDiscovery, StaticDiscovery, parse_endpoints
from disagg.routing.endpoint import Endpoint
from disagg.routing.errors import IncompatibleWorkerError, NoEndpointError, OverloadedError, RoutingError
from disagg.routing.pool import EndpointPool
from disagg.routing.prefix_index import PrefixIndex, block_hashes
from disagg.routing.scheduler import Pick, PickRequest, Scheduler

__all__ = [
    "Discovery",
    "Endpoint",
    "EndpointPool",
    "FixedDiscovery",
    "IncompatibleWorkerError",
    "NoEndpointError",
    "OverloadedError",
    "Pick",
    "PickRequest",
    "PrefixIndex",
    "RoutingError",
    "Scheduler",
    "StaticDiscovery",
    "block_hashes",
    "parse_endpoints",
]
