"""Replicas that die (on the stack with two decodes). A decode worker that dies mid-stream is
survived (issue 15, item 16): the Router moves the
request to the other decode with the prompt and the tokens generated so far, and the client's
stream goes on with no token missing or repeated. Under greedy decoding the answer is the
unbroken one up to the move and, after it, exactly what the engine answers for the prompt plus
those tokens (recomputing them is not bit-equal to having decoded them one by one, and this
random-weight model's near-ties can tip on that; it usually gives the unbroken answer whole).
A prefill replica killed outright takes its engine with it (issue 15, item 14)."""

from __future__ import annotations

import json
import re
import time

import httpx
import psutil
import pytest

from tests.support.workers import metric

pytestmark = pytest.mark.integration

BODY = {"model": "tiny", "prompt": "the quick brown fox jumps over the lazy dog " * 4, "max_tokens": 600,
        "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
        "return_tokens_as_token_ids": True}


@pytest.fixture(scope="module")
def stack(two_decodes):
    return two_decodes.stack


def stream_tokens(url: str, on_chunk=None) -> tuple[list[str], list[dict], httpx.Headers]:
    """The streamed tokens (`token_id:N` strings), the raw events and the response headers."""
    tokens, events = [], []
    with httpx.stream("POST", f"{url}/v1/completions", json=BODY, timeout=300) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            events.append(event)
            assert "error" not in event, event
            for choice in event.get("choices", []):
                tokens += (choice.get("logprobs") or {}).get("tokens") or []
            if on_chunk is not None:
                on_chunk(len(events), r.headers)
        return tokens, events, r.headers


def tokenize(model: str, text: str) -> list[int]:
    """The prompt's token ids as the Router tokenizes them (its tokenizer: the model's own)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)(text)["input_ids"]


def listener_pid(address: str) -> int:
    port = int(address.rpartition(":")[2])
    return next(c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port
                and c.status == psutil.CONN_LISTEN)


def test_a_decode_that_dies_mid_stream_is_survived_with_the_same_answer(stack, tiny_model) -> None:
    BODY["logprobs"] = 0  # the tokens as ids, to compare exactly
    started = time.monotonic()
    unbroken, unbroken_events, _ = stream_tokens(stack.url)
    took = time.monotonic() - started
    assert len(unbroken) == BODY["max_tokens"]
    # Looked up before the stream: scanning every socket of the machine takes long enough on a
    # busy one for the decode to finish before it is killed.
    pids = {address: listener_pid(address) for address in stack.workers("decode")}
    killed = []

    def kill_its_decode(n: int, headers: httpx.Headers) -> None:
        # At the first event: a decode that has already sent every token cannot cut the stream.
        if not killed:
            pid = pids[headers["x-disagg-decode"]]
            psutil.Process(pid).kill()
            killed.append(pid)

    migrations = lambda: metric(stack.url, "disagg_migrations_total")  # noqa: E731
    before = migrations()
    migrated, events, headers = stream_tokens(stack.url, kill_its_decode)
    assert killed, "the stream ended before its decode could be killed"
    # The Router moved it (not a stream that outlived the kill: the unbroken one took this long).
    assert migrations() == before + 1, (f"unbroken: {len(unbroken_events)} events in {took:.2f} s; "
                                        f"killed at the first of {len(events)}")
    assert len(migrated) == BODY["max_tokens"]
    moved_at = int(re.findall(r"migrating request \S+ with (\d+) tokens generated", stack.log.read_text())[-1])
    assert 0 < moved_at < BODY["max_tokens"]
    assert migrated[:moved_at] == unbroken[:moved_at]  # nothing lost or repeated before the move
    # After it: the engine's own greedy answer for the prompt plus the tokens before the move.
    ids = [int(t.split(":")[1]) for t in migrated[:moved_at]]
    rest = httpx.post(f"{stack.url}/v1/completions", timeout=300, json={
        **BODY, "prompt": tokenize(tiny_model, BODY["prompt"]) + ids, "stream": False,
        "max_tokens": BODY["max_tokens"] - moved_at}).json()
    assert rest["choices"][0]["logprobs"]["tokens"] == migrated[moved_at:]
    usage = next(e["usage"] for e in reversed(events) if e.get("usage"))
    assert usage["completion_tokens"] == BODY["max_tokens"]
    assert usage["prompt_tokens"] == next(e["usage"] for e in events if e.get("usage"))["prompt_tokens"]


def test_an_engine_does_not_outlive_its_replica(stack) -> None:
    """A prefill replica killed outright (as Ray kills an unhealthy one): its vLLM engine core and
    worker end with it, though Ray puts them in the replica's process group and nobody signals
    them; Serve starts a new replica, with an engine of its own."""
    (replica,) = [p for p in psutil.Process(stack.proc.pid).children(recursive=True)
                  if p.name().startswith("ray::ServeReplica") and "PrefillServer" in " ".join(p.cmdline())]
    engine = [p for p in replica.children(recursive=True) if p.name().startswith("VLLM::")]
    assert {p.name() for p in engine} == {"VLLM::EngineCore", "VLLM::Worker"}
    (old,) = stack.workers("prefill")
    replica.kill()
    gone, alive = psutil.wait_procs(engine, timeout=15)
    assert alive == [], f"{[p.name() for p in alive]} outlived their replica"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and stack.workers("prefill") in ([], [old]):
        time.sleep(1)
    assert stack.workers("prefill") not in ([], [old]), "Serve did not bring a new prefill up"
