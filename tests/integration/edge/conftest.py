"""One `disagg serve --gateway` (1 prefill + 1 decode) for every module of the edge's tests:
hostile input, the fuzz, internal ports, the OpenAI features and the serve stack end to end. A stack start costs about 90 s
of this machine's two cores; the modules only read the stack, so they share one (package scope:
it stops after the last of them)."""

from __future__ import annotations

import pytest

from tests.support.serve_stack import start_serve_stack
from tests.support.workers import free_port

# The stack's internal token, fixed so tests can call /internal/prefill past its check.
TOKEN = "edge-tests-token"
# Each prefill attempt's timeout (the OpenAI features test a stalled prefill's fallback).
PREFILL_TIMEOUT_S = 8


@pytest.fixture(scope="package")
def stack(tiny_model, tmp_path_factory):
    # A short lease: a prefill the fuzz or a test could make valid by chance frees its blocks soon.
    s = start_serve_stack(tiny_model, tmp_path_factory.mktemp("edge"),
                          settings=["kv_lease_s=5", f"internal_token={TOKEN}", f"prefill_timeout_s={PREFILL_TIMEOUT_S}"],
                          args=["--gateway", "--gateway-port", str(free_port())])
    yield s
    s.stop()


# Tests that leave the shared stack broken or changed, in the order they run after every other
# test of this package: a prefill replica killed (Serve replaces it), then the decode engine
# killed (the stack does not serve again until Serve replaces the decode replica).
LAST = ("test_serve_stack.py::test_killed_prefill_replica_is_survived_then_replaced",
        "test_hostile_input.py::test_a_stream_that_fails_after_it_started_ends_with_an_error_event_and_done")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = [i for i, item in enumerate(items) if item.path.parent.name == "edge"]
    if not here:
        return
    mine = [items[i] for i in here]
    key = {name: rank for rank, name in enumerate(LAST)}
    rank = lambda item: key.get(f"{item.path.name}::{item.name}", -1)  # noqa: E731
    ordered = [item for item in mine if rank(item) < 0] + sorted((item for item in mine if rank(item) >= 0), key=rank)
    for i, item in zip(here, ordered):
        items[i] = item
