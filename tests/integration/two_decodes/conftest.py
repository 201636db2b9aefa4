"""One `disagg serve --gateway --epp-replicas 2` with two decodes (and one prefill) for the tests
that need a second decode: picker replicas under Serve, then the deaths of replicas (a decode
mid-stream, a prefill outright). The modules run in that order (by name): the deaths come last."""

from __future__ import annotations

from typing import NamedTuple

import pytest

from disagg.epp.replicas import ReplicaPorts
from tests.integration.test_epp_replicas import free_base
from tests.support.serve_stack import ServeStack, start_serve_stack
from tests.support.workers import free_port


class TwoDecodes(NamedTuple):
    stack: ServeStack
    base: ReplicaPorts  # replica 0's ports (replica i's are these + 100*i)


@pytest.fixture(scope="package")
def two_decodes(tiny_model, tmp_path_factory):
    base = free_base()
    # float32: the migration test compares a continuation with its greedy reference token for token;
    # in bfloat16 the reference (its prompt partly a prefix-cache hit) tipped a near-tie of this
    # random-weight model 22 tokens in.
    s = start_serve_stack(tiny_model, tmp_path_factory.mktemp("two-decodes"),
                          settings=["decode.replicas=2", "dtype=float32"],
                          args=["--gateway", "--gateway-port", str(free_port()), "--epp-replicas", "2",
                                "--epp-ports", f"{base.grpc},{base.health},{base.metrics},{base.peer}"])
    try:
        assert len(s.workers("decode")) == 2
        yield TwoDecodes(s, base)
    finally:
        s.stop()
