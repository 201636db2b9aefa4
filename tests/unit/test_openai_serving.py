"""OpenAI request handling with the tiny model's real tokenizer: validation, errors, responses."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from disagg.engine.base import GenerateOutput
from disagg.openai.errors import APIError
from disagg.openai.serving import Preprocessor, ResponseBuilder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pre(tiny_model):
    return Preprocessor(tiny_model, "tiny", max_model_len=256)


def body(**kw) -> bytes:
    return json.dumps({"model": "tiny", **kw}).encode()


def test_chat_template_is_applied_and_tokenized(pre):
    p = pre.prepare("chat", body(messages=[{"role": "user", "content": "hello"}], max_tokens=5))
    text = pre.tokenizer.decode(p.generate.prompt_token_ids)
    assert text == "<|user|>\nhello</s>\n<|assistant|>\n"
    assert p.generate.sampling.max_tokens == 5


def test_defaults_fill_the_remaining_context(pre):
    p = pre.prepare("completion", body(prompt="hello world"))
    assert p.generate.sampling.max_tokens == 256 - len(p.generate.prompt_token_ids)
    assert p.generate.sampling.temperature == 1.0


@pytest.mark.parametrize(
    "raw,status,param",
    [
        (b"{", 400, None),
        (b"[1,2]", 400, None),
        (body(prompt=""), 400, "prompt"),
        (body(prompt="x", max_tokens=0), 400, "max_tokens"),
        (body(prompt="x", top_p=0), 400, "top_p"),
        (body(prompt="x", stop=["a", "b", "c", "d", "e"]), 400, "stop"),
        (body(prompt=[1, 2, 99999]), 400, "prompt"),
        (body(prompt="x", n=17), 400, "n"),
        (json.dumps({"model": "other", "prompt": "x"}).encode(), 404, "model"),
        (body(prompt="word " * 300), 400, "prompt"),
        (body(prompt="x", max_tokens=300), 400, "max_tokens"),
    ],
)
def test_bad_requests_are_4xx_with_openai_body(pre, raw, status, param):
    with pytest.raises(APIError) as e:
        pre.prepare("completion", raw)
    assert e.value.status == status
    err = e.value.body()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param:
        assert err["param"] == param


def test_context_error_names_the_limit(pre):
    with pytest.raises(APIError, match="maximum context length is 256"):
        pre.prepare("completion", body(prompt="word " * 300))


def outputs(rid: str):
    yield GenerateOutput(rid, [5], "Hel", num_prompt_tokens=3)
    yield GenerateOutput(rid, [6], "lo", num_prompt_tokens=3)
    yield GenerateOutput(rid, [7], "!", finished=True, finish_reason="length", num_prompt_tokens=3)


async def aiter(items):
    for x in items:
        yield x


def test_non_stream_response_accumulates(pre):
    p = pre.prepare("chat", body(messages=[{"role": "user", "content": "hi"}], max_tokens=3))
    b = ResponseBuilder(p, "tiny")
    for o in outputs(p.response_id):
        b.add(o)
    r = b.response()
    assert r["choices"][0]["message"] == {"role": "assistant", "content": "Hello!"}
    assert r["choices"][0]["finish_reason"] == "length"
    assert r["usage"]["completion_tokens"] == 3
    assert r["usage"]["prompt_tokens"] == len(p.generate.prompt_token_ids)


async def test_stream_has_role_deltas_finish_usage_done(pre):
    p = pre.prepare("chat", body(messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True,
                                 stream_options={"include_usage": True}))
    events = [e async for e in ResponseBuilder(p, "tiny").sse(aiter(list(outputs(p.response_id))))]
    assert events[-1] == b"data: [DONE]\n\n"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "Hello!"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


async def test_error_mid_stream_becomes_an_error_event(pre):
    p = pre.prepare("completion", body(prompt="hi", max_tokens=3, stream=True))

    async def failing():
        yield GenerateOutput(p.response_id, [1], "a")
        raise APIError(503, "decode worker died")

    events = [e async for e in ResponseBuilder(p, "tiny").sse(failing())]
    assert json.loads(events[-2][6:])["error"]["message"] == "decode worker died"
    assert events[-1] == b"data: [DONE]\n\n"


def test_the_generic_fast_tokenizer_loads_as_autotokenizer_makes_it_without_torch(tiny_model) -> None:
    # In a process of its own: whether torch is imported is a property of the process.
    script = f"""
import sys
from disagg.openai.serving import load_tokenizer
ours = load_tokenizer({tiny_model!r})
assert "torch" not in sys.modules, "load_tokenizer imported torch"
from transformers import AutoTokenizer
auto = AutoTokenizer.from_pretrained({tiny_model!r})
assert type(ours) is type(auto), (type(ours), type(auto))
texts = ["hello world", "Prüfung ①ﬁ Ａ 😀 漢字", "  x\\u0301\\n\\t", "<s> </s> <unk>", ""]
assert [ours(t)["input_ids"] for t in texts] == [auto(t)["input_ids"] for t in texts]
messages = [{{"role": "system", "content": "be brief"}}, {{"role": "user", "content": "hi"}}]
assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \\
    auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
assert (len(ours), ours.all_special_ids, ours.model_max_length) == (len(auto), auto.all_special_ids, auto.model_max_length)
print("same")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip().endswith("same"), done.stdout[-2000:] + done.stderr[-2000:]
