"""The EPP's shortcuts give exactly what the general way gives: the hand-written body echo is
protobuf's bytes, and the typed completion reader reads (or refuses) as the field-by-field one."""

from __future__ import annotations

import json

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from disagg.epp.ext_proc import REQUEST_BODY, RESPONSE_BODY, streamed_body
from disagg.epp.prompt import RawPromptReader
from disagg.openai.errors import APIError


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16383, 16384, 65536, 2**21])
@pytest.mark.parametrize("end_of_stream", [False, True])
@pytest.mark.parametrize("phase", ["request_body", "response_body"])
def test_streamed_body_is_protobufs_serialization(size: int, end_of_stream: bool, phase: str) -> None:
    chunk = bytes(range(256)) * (size // 256) + bytes(size % 256)
    expected = pb.ProcessingResponse(**{phase: pb.BodyResponse(response=pb.CommonResponse(
        body_mutation=pb.BodyMutation(streamed_response=pb.StreamedBodyResponse(
            body=chunk, end_of_stream=end_of_stream))))}).SerializeToString()
    number = REQUEST_BODY if phase == "request_body" else RESPONSE_BODY
    assert streamed_body(number, chunk, end_of_stream) == expected


BODIES = [
    {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4},
    {"model": "tiny", "prompt": "hello", "stream": True},
    {"model": "tiny", "prompt": "héllo ✓"},
    {"model": "tiny", "prompt": ["hello"]},
    {"model": "tiny", "prompt": [[5, 6, 7]]},
    {"model": "tiny", "prompt": [1, True]},  # bools are ints in JSON's Python reading: kept as before
    {"model": "tiny", "prompt": [1, 2.5]},
    {"model": "tiny", "prompt": []},
    {"model": "tiny", "prompt": ""},
    {"model": "tiny", "prompt": None},
    {"model": "tiny"},
    {"model": "other", "prompt": [1]},
    {"model": 7, "prompt": [1]},
    {"prompt": [1]},
    [1, 2],
    "tiny",
]


def outcome(read, *args):
    try:
        r = read(*args)
    except APIError as exc:
        return ("error", exc.status, exc.body())
    return ("pick", r.model, list(r.prompt_token_ids), r.subset)


@pytest.mark.parametrize("body", [json.dumps(b).encode() for b in BODIES] + [b"{not json", b"\xff"])
def test_completion_fast_path_reads_as_the_general_reader(body: bytes) -> None:
    reader = RawPromptReader("tiny")
    fast = outcome(reader.read, "/v1/completions", body, ["10.0.0.1:8000"])
    assert fast == outcome(reader.read_any, "completion", body, ["10.0.0.1:8000"])
