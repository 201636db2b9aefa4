"""The application under Ray Serve's local testing mode (no cluster): what a user's pytest does.
Real engines, real NIXL hand-off; the router, registry and workers all run in this process."""

from __future__ import annotations

import re
import time

import httpx
import prometheus_client
import pytest
from ray import serve

from deployments.app import build_app
from disagg.config import AppConfig
from disagg.openai.errors import APIError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def router(tiny_model):
    config = AppConfig(model=tiny_model, block_size=32, max_model_len=1024,
                       routing={"pd_threshold_tokens": 32})
    handle = serve.run(build_app(config), _local_testing_mode=True)
    # Serve's local mode never calls serve.shutdown() here: that would start a real Ray.
    deadline = time.monotonic() + 300
    while sorted({w["role"] for w in handle.workers.remote().result()}) != ["decode", "prefill"]:
        assert time.monotonic() < deadline, "the router's pool never held both roles"
        time.sleep(0.5)
    return handle


def call(router, kind: str, body: dict, timeout_s: float = 120) -> dict:
    """Retries while the router's pool fills (503), as a client of a starting service would."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return router.openai.remote(kind, body).result()
        except APIError as e:
            if e.status != 503 or time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def test_completion_through_local_mode_is_disaggregated_and_correct(router):
    prompt = " ".join(f"token{k % 97} cat" for k in range(60))
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0}
    result = call(router, "completion", body)
    assert result["usage"]["completion_tokens"] == 12
    # Reference: the decode worker's own endpoint, prefilling locally.
    decode = next(w for w in router.workers.remote().result() if w["role"] == "decode")
    ref = httpx.post(f"http://{decode['address']}/v1/completions", json=body, timeout=60).json()
    assert result["choices"][0]["text"] == ref["choices"][0]["text"]
    # Everything runs in this process in local mode, so the disagg_* series are in its registry.
    samples = {(m.name, tuple(sorted(m.labels.items()))): m.value
               for family in prometheus_client.REGISTRY.collect() if family.name.startswith("disagg_")
               for m in family.samples}
    remote = [v for (name, labels), v in samples.items()
              if name == "disagg_prefill_handoffs_total" and ("result", "remote") in labels]
    assert remote == [1.0], {k: v for k, v in samples.items() if "handoffs" in k[0] or "attempts" in k[0]}


def test_bad_request_raises_openai_error_through_the_handle(router):
    with pytest.raises(APIError) as e:
        call(router, "completion", {"model": "nope", "prompt": "x"})
    assert e.value.status == 404

