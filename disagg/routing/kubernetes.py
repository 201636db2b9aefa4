"""Workers discovered from Kubernetes pods (the `kubernetes` client; no Ray).

Pods matching a label selector, Running and Ready, with an IP, are asked for their descriptor at
`http://POD_IP:PORT/v1/worker`. The pod's role label (default `disagg.io/role`) must agree with
the role the worker reports; a pod whose label and descriptor disagree is left out, loudly. A
listed pod that does not answer keeps its last descriptor (the scrapes decide whether it is
alive). The pod list is re-read every `interval_s`, and at once when the watch stream reports a
change.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp

from disagg.messages import WorkerInfo
from disagg.routing.discovery import fetch_worker_info

log = logging.getLogger(__name__)

_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def own_namespace() -> str:
    try:
        return _NAMESPACE_FILE.read_text().strip() or "default"
    except OSError:
        return "default"


def pod_is_ready(pod: Any) -> bool:
    status = pod.status
    if status is None or status.phase != "Running" or not status.pod_ip:
        return False
    if pod.metadata.deletion_timestamp is not None:
        return False
    return any(c.type == "Ready" and c.status == "True" for c in (status.conditions or []))


def _core_api() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CoreV1Api()


class KubernetesDiscovery:
    def __init__(
        self,
        label_selector: str,
        *,
        namespace: str | None = None,
        port: int = 8000,
        role_label: str = "disagg.io/role",
        interval_s: float = 2.0,
        timeout_s: float = 1.0,
        api: Any = None,
        use_watch: bool = True,
    ) -> None:
        self.label_selector = label_selector
        self.namespace = namespace or own_namespace()
        self.port = port
        self.role_label = role_label
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.api = api
        self.use_watch = use_watch

    def _ready_pods(self, api: Any) -> dict[str, str | None]:
        """address -> role label, for every ready pod of the selector."""
        pods = api.list_namespaced_pod(self.namespace, label_selector=self.label_selector)
        return {
            f"{pod.status.pod_ip}:{self.port}": (pod.metadata.labels or {}).get(self.role_label)
            for pod in pods.items if pod_is_ready(pod)
        }

    def _watch_changes(self, api: Any, loop: asyncio.AbstractEventLoop, changed: asyncio.Event,
                       stop: threading.Event) -> None:
        from kubernetes import watch

        while not stop.is_set():
            try:
                for _ in watch.Watch().stream(api.list_namespaced_pod, self.namespace,
                                              label_selector=self.label_selector, timeout_seconds=30):
                    loop.call_soon_threadsafe(changed.set)
                    if stop.is_set():
                        return
            except Exception as exc:  # the API server went away: poll until it is back
                log.warning("pod watch failed: %s", exc)
                stop.wait(self.interval_s)

    async def watch(self) -> AsyncIterator[list[WorkerInfo]]:
        api = self.api or await asyncio.to_thread(_core_api)
        changed = asyncio.Event()
        stop = threading.Event()
        if self.use_watch:
            threading.Thread(target=self._watch_changes, args=(api, asyncio.get_running_loop(), changed, stop),
                             daemon=True, name="disagg-pod-watch").start()
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        try:
            known: dict[str, WorkerInfo] = {}
            while True:
                changed.clear()
                try:
                    pods = await asyncio.to_thread(self._ready_pods, api)
                except Exception as exc:
                    log.warning("listing pods failed: %s", exc)
                    pods = None
                if pods is not None:
                    known = {a: i for a, i in known.items() if a in pods}
                    known.update(await self._describe(session, pods))
                    yield [i for a, i in known.items() if pods[a] in (None, i.role)]
                try:
                    await asyncio.wait_for(changed.wait(), self.interval_s)
                except asyncio.TimeoutError:
                    pass
        finally:
            stop.set()
            await session.close()

    async def _describe(self, session: aiohttp.ClientSession, pods: dict[str, str | None]) -> dict[str, WorkerInfo]:
        infos = await asyncio.gather(*(fetch_worker_info(session, address) for address in pods))
        out: dict[str, WorkerInfo] = {}
        for address, info in zip(pods, infos):
            if info is None:
                continue
            label = pods[address]
            if label is not None and label != info.role:
                log.error("pod %s is labelled %s=%s but its worker is a %s worker: left out",
                          address, self.role_label, label, info.role)
                continue
            out[address] = info
        return out


class KubernetesPeers:
    """The picker's peer replicas: the ready pods of its own Deployment (a label selector),
    reached at `tcp://POD_IP:port`, re-listed every `interval_s`."""

    def __init__(self, label_selector: str, *, namespace: str | None = None, port: int, interval_s: float = 2.0,
                 api: Any = None) -> None:
        self.label_selector = label_selector
        self.namespace = namespace or own_namespace()
        self.port = port
        self.interval_s = interval_s
        self.api = api

    async def watch(self) -> AsyncIterator[list[str]]:
        api = self.api or await asyncio.to_thread(_core_api)
        last: list[str] | None = None
        while True:
            try:
                pods = await asyncio.to_thread(api.list_namespaced_pod, self.namespace, label_selector=self.label_selector)
            except Exception as exc:
                log.warning("listing the picker's peer pods failed: %s", exc)
            else:
                current = sorted(f"tcp://{p.status.pod_ip}:{self.port}" for p in pods.items if pod_is_ready(p))
                if current != last:
                    last = current
                    yield current
            await asyncio.sleep(self.interval_s)
