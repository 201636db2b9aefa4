"""The application under Ray Serve's local testing mode (no cluster): what a user's pytest does.
Real engines, real NIXL hand-off; the router, registry and workers all run in this process."""

from __future__ import annotations

import time

import httpx
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
    metrics = httpx.get(f"http://{decode['address']}/metrics", timeout=5).text
    assert 'disagg_prefill_handoffs_total{result="remote"} 1.0' in metrics


def test_bad_request_raises_openai_error_through_the_handle(router):
    with pytest.raises(APIError) as e:
        call(router, "completion", {"model": "nope", "prompt": "x"})
    assert e.value.status == 404

