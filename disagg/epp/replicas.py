"""Active-active picker replicas behind one Envoy, for `disagg serve --gateway --epp-replicas N`.

Replica i is a `disagg epp` process on the EPP's ports plus 100·i (gRPC 9002+100·i, health
9003+100·i, metrics 9090+100·i, picks shared with its peers 9004+100·i; other bases can be
given) whose peers are the other replicas. Envoy's ext_proc cluster lists every replica,
health-checked, so a replica that dies is skipped within a health check interval (0.25 s). A
replica that exits is started again on the same ports; it rebuilds its state from discovery,
load reports, KV event replay and its peers' notices. All replicas serve one self-signed
certificate made here, which Envoy trusts.

    replicas = await EppReplicas(config, ["--router-url", url], 2, gateway_port=8080).start()
    replicas.url; await replicas.stop()
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from disagg.children import start_child, stop_child
from disagg.config import AppConfig
from disagg.epp.envoy import EnvoyProcess, EnvoySettings
from disagg.epp.protocol import DEFAULT_GRPC_PORT, DEFAULT_HEALTH_PORT, DEFAULT_METRICS_PORT, DEFAULT_PEER_PORT
from disagg.epp.tls import CERT_FILE, write_self_signed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaPorts:
    grpc: int = DEFAULT_GRPC_PORT
    health: int = DEFAULT_HEALTH_PORT
    metrics: int = DEFAULT_METRICS_PORT
    peer: int = DEFAULT_PEER_PORT

    def of(self, i: int) -> "ReplicaPorts":
        return ReplicaPorts(self.grpc + 100 * i, self.health + 100 * i, self.metrics + 100 * i, self.peer + 100 * i)


class EppReplicas:
    def __init__(self, config: AppConfig, discovery_args: list[str], replicas: int, *, gateway_port: int,
                 gateway_host: str | None = None, host: str = "127.0.0.1", base: ReplicaPorts = ReplicaPorts(),
                 secure_serving: bool = True, start_timeout_s: float = 60.0) -> None:
        self.config = config
        self.discovery_args = discovery_args
        self.count = replicas
        self.gateway_port = gateway_port
        self.gateway_host = gateway_host or config.host
        self.host = host
        self.base = base
        self.secure_serving = secure_serving
        self.start_timeout_s = start_timeout_s
        self.workdir = Path(tempfile.mkdtemp(prefix="disagg-epp-replicas-"))
        self.processes: list[subprocess.Popen | None] = [None] * replicas
        self.restarts = [0] * replicas
        self.envoy: EnvoyProcess | None = None
        self.url: str | None = None
        self._watchdog: asyncio.Task | None = None

    def ports(self, i: int) -> ReplicaPorts:
        return self.base.of(i)

    async def start(self) -> "EppReplicas":
        try:
            (self.workdir / "config.yaml").write_text(yaml.safe_dump(self.config.model_dump(mode="json")))
            if self.secure_serving:
                await asyncio.to_thread(write_self_signed, self.workdir / "tls", [self.host])
            await asyncio.gather(*(self._launch(i) for i in range(self.count)))
            first, *others = [self.ports(i).grpc for i in range(self.count)]
            self.envoy = EnvoyProcess(EnvoySettings(
                listen_host=self.gateway_host, listen_port=self.gateway_port, epp_host=self.host, epp_port=first,
                epp_replicas=[(self.host, p) for p in others], eds_dir=self.workdir,
                request_timeout_s=self.config.request_timeout_s, max_request_bytes=self.config.max_request_bytes,
                flow_control_ttl_s=self.config.routing.flow_control.ttl_s,
                epp_trusted_ca=self.workdir / "tls" / CERT_FILE if self.secure_serving else None))
            await self.envoy.start()
        except BaseException:
            await self.stop()
            raise
        self.url = self.envoy.url
        self._watchdog = asyncio.create_task(self._restart_the_dead(), name="disagg-epp-watchdog")
        log.info("gateway on %s with %d picker replicas", self.url, self.count)
        return self

    async def _launch(self, i: int) -> None:
        ports, peers = self.ports(i), [f"tcp://{self.host}:{self.ports(j).peer}" for j in range(self.count) if j != i]
        cmd = [sys.executable, "-m", "disagg.cli", "epp", "--config", str(self.workdir / "config.yaml"),
               *self.discovery_args, "--host", self.host, "--grpc-port", str(ports.grpc),
               "--health-port", str(ports.health), "--metrics-port", str(ports.metrics),
               "--peer-port", str(ports.peer), "--peers", ",".join(peers), "--replica-id", f"epp-{i}",
               # Every replica keeps Envoy's worker list (the same decodes) in the one file.
               "--eds-dir", str(self.workdir), "--log-level", "WARNING"]
        cmd += ["--cert-path", str(self.workdir / "tls")] if self.secure_serving else ["--secure-serving=false"]
        log_path = self.workdir / f"epp-{i}.log"
        started = log_path.stat().st_size if log_path.exists() else 0  # a restart appends to the log
        with open(log_path, "ab") as out:
            process = start_child(cmd, stdout=out, stderr=subprocess.STDOUT)
        self.processes[i] = process
        deadline = time.monotonic() + self.start_timeout_s
        while "READY epp" not in log_path.read_bytes()[started:].decode(errors="replace"):
            if process.poll() is None and time.monotonic() > deadline:
                # Its threads' stacks into its log (faulthandler), then ended: the watchdog starts
                # it again rather than wait on a process that may never get ready.
                process.send_signal(signal.SIGUSR1)
                await asyncio.sleep(1.0)
                await asyncio.to_thread(stop_child, process)
            if process.poll() is not None:
                tail = log_path.read_bytes()[started:].decode(errors="replace")[-6000:]
                raise RuntimeError(f"picker replica {i} did not start in {self.start_timeout_s:.0f} s "
                                   f"(exit {process.returncode}): {tail}")
            await asyncio.sleep(0.05)

    async def _restart_the_dead(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            for i, process in enumerate(self.processes):
                if process is not None and process.poll() is not None:
                    log.warning("picker replica %d exited with %s; starting it again", i, process.returncode)
                    self.restarts[i] += 1
                    try:
                        await self._launch(i)
                    except RuntimeError as exc:
                        log.error("%s", exc)

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
        if self.envoy is not None:
            await self.envoy.stop()
        await asyncio.gather(*(asyncio.to_thread(stop_child, p) for p in self.processes if p is not None))
        shutil.rmtree(self.workdir, ignore_errors=True)
