"""`disagg epp` command line: discovery from flags, and the EPP + Envoy it starts."""

from __future__ import annotations

import pytest

from disagg.epp.cli import make_discovery, parse_args
from disagg.routing import StaticDiscovery
from disagg.routing.kubernetes import KubernetesDiscovery


def test_defaults_are_the_gie_ports() -> None:
    args = parse_args(["--endpoints", "a:1"])
    assert (args.grpc_port, args.health_port, args.metrics_port) == (9002, 9003, 9090)
    assert args.gateway_port is None


def test_static_endpoints_make_a_static_discovery() -> None:
    discovery = make_discovery(parse_args(["--endpoints", "10.0.0.1:8000,10.0.0.2:8000"]))
    assert isinstance(discovery, StaticDiscovery)
    assert discovery.addresses == ["10.0.0.1:8000", "10.0.0.2:8000"]


def test_selector_makes_a_kubernetes_discovery() -> None:
    args = parse_args(["--k8s-selector", "app=disagg", "--k8s-namespace", "llm", "--k8s-port", "8001"])
    discovery = make_discovery(args)
    assert isinstance(discovery, KubernetesDiscovery)
    assert (discovery.label_selector, discovery.namespace, discovery.port) == ("app=disagg", "llm", 8001)


def test_without_a_source_it_refuses_to_start() -> None:
    with pytest.raises(SystemExit):
        make_discovery(parse_args([]))
