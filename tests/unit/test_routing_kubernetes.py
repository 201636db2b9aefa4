"""Kubernetes discovery: ready pods of the selector, described by their workers, roles checked."""

from __future__ import annotations

from types import SimpleNamespace as NS

from disagg.bench.standin import StandInWorker
from disagg.routing.kubernetes import KubernetesDiscovery


def pod(ip: str, role: str | None, *, phase: str = "Running", ready: bool = True, deleting: bool = False):
    labels = {"app": "disagg"} | ({"disagg.io/role": role} if role else {})
    return NS(
        metadata=NS(labels=labels, deletion_timestamp="now" if deleting else None),
        status=NS(phase=phase, pod_ip=ip, conditions=[NS(type="Ready", status="True" if ready else "False")]),
    )


class FakeCoreApi:
    def __init__(self, pods):
        self.pods = pods
        self.calls = []

    def list_namespaced_pod(self, namespace, label_selector):
        self.calls.append((namespace, label_selector))
        return NS(items=self.pods)


async def test_ready_pods_with_matching_roles_are_discovered() -> None:
    decode = StandInWorker("decode").start()
    prefill = StandInWorker("prefill").start()
    try:
        # All fakes listen on 127.0.0.1 with distinct ports; a pod port per worker is simulated
        # by one discovery per port.
        api = FakeCoreApi([pod("127.0.0.1", "decode"), pod("10.255.255.1", "decode", ready=False),
                           pod("10.255.255.2", "decode", phase="Pending"), pod("10.255.255.3", None, deleting=True)])
        discovery = KubernetesDiscovery("app=disagg", namespace="ns", port=decode.port, api=api, use_watch=False)
        snapshot = await anext(discovery.watch())
        assert [i.address for i in snapshot] == [decode.address]
        assert api.calls == [("ns", "app=disagg")]
    finally:
        decode.stop()
        prefill.stop()


async def test_pod_whose_label_contradicts_its_worker_is_left_out() -> None:
    worker = StandInWorker("prefill").start()
    try:
        api = FakeCoreApi([pod("127.0.0.1", "decode")])
        discovery = KubernetesDiscovery("app=disagg", namespace="ns", port=worker.port, api=api, use_watch=False)
        assert await anext(discovery.watch()) == []
    finally:
        worker.stop()


async def test_the_pickers_peers_are_its_ready_pods() -> None:
    from disagg.routing.kubernetes import KubernetesPeers

    api = FakeCoreApi([pod("10.1.0.1", None), pod("10.1.0.2", None), pod("10.1.0.3", None, ready=False)])
    peers = KubernetesPeers("app.kubernetes.io/component=epp", namespace="ns", port=9004, api=api)
    assert await anext(peers.watch()) == ["tcp://10.1.0.1:9004", "tcp://10.1.0.2:9004"]
    assert api.calls == [("ns", "app.kubernetes.io/component=epp")]
