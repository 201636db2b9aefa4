"""Hostile requests for an OpenAI endpoint, generated from a seed, and a driver that sends them
to any base URL (the Router, a worker's own endpoint, the gateway) and says what went wrong.

A request is a `Case`: an HTTP request (method, path, headers, body) or raw bytes for a socket
(malformed HTTP). `HostileRequests(seed).cases(n)` yields n of them; `drive(url, cases)` sends
them, a few at a time, each under its own timeout, and returns an `Outcome` per case; `problems`
lists what an outcome breaks: an answer >= 500 (or a 5xx error event in a stream), no answer in
time, an error body that is not OpenAI's, a stream that ends without [DONE]."""

from __future__ import annotations

import json
import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator
from urllib.parse import quote, urlsplit

import httpx

ERROR_KEYS = {"message", "type", "param", "code"}
JSON = "application/json"


@dataclass
class Case:
    kind: str  # which hostility, for the report
    method: str = "POST"
    path: str = "/v1/completions"
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": JSON})
    body: bytes | None = None
    # Raw bytes for a socket instead of an HTTP request (malformed HTTP): the server's HTTP layer
    # answers these, and the Serve proxy's (uvicorn's) answer is text/plain.
    raw: bytes | None = None

    def describe(self) -> str:
        if self.raw is not None:
            return f"{self.kind}: raw {self.raw[:120]!r}"
        body = (self.body or b"")[:160]
        return f"{self.kind}: {self.method} {self.path[:80]} {self.headers} {body!r} ({len(self.body or b'')} bytes)"


@dataclass
class Outcome:
    case: Case
    status: int | None  # None: no status line (the server closed, or the client timed out)
    content_type: str = ""
    body: bytes = b""
    timed_out: bool = False
    seconds: float = 0.0


# A string json.dumps writes as "@@HOLE@@", replaced in the JSON text by what json.dumps cannot
# write (lone surrogate escapes, 20,000 levels of nesting, NaN, 4,301-digit numbers).
_HOLE = "@@HOLE@@"

_OPTIONAL = ["n", "stream", "stream_options", "temperature", "top_p", "max_tokens", "max_completion_tokens",
             "seed", "stop", "echo", "ignore_eos", "user"]
_NUMBERS = ["seed", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "top_k",
            "presence_penalty", "frequency_penalty"]
_NUMBER_TEXTS = ["18446744073709551616", "9223372036854775808", "-9223372036854775809", "9223372036854775807",
                 "1" + "0" * 30, "1e308", "-1e308", "1e400", "-1e400", "1e-320", "0", "-0", "-1", "-0.0", "0.5",
                 "1.5", "2.0000001", "NaN", "Infinity", "-Infinity", "1" * 4301, "0x10", "01", ".5", "1.", "+1",
                 "4294967296", "-2147483649", "true", "3"]
_WRONG_TYPES: list[Any] = ["a string", "", [], {}, True, False, 0, 1.5, [1, "a"], {"x": 1}, [[[]]], "1", "null"]
_CONTENT_TYPES = [None, "", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                  "application/json; charset=utf-16", "application/json; charset=latin-1", "application/jsonp",
                  "application/*", "*/*", "application/ld+json", "text/json", "json", "application/json;;;",
                  "application/json; charset=utf-8", "APPLICATION/JSON", "application/json ; boundary=x"]
_METHODS = ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "PROPFIND", "POST"]
_PATHS = ["/", "/v1", "/v1/", "/v1/completion", "/v1/completions/", "/v1//completions", "/V1/COMPLETIONS",
          "/v1/chat", "/v1/chat/completions/x", "/v1/models/tiny", "/v1/embeddings", "/%2e%2e/%2e%2e/etc/passwd",
          "/v1/%ff%fe", "/v1/%00", "/v1/completions%00", "/\u00e9t\u00e9", "/" + "a" * 6000, "/internal/prefill",
          "/metrics?name[]=%ff&name[]=" + "x" * 500, "/v1/pool?x=1", "/health?%zz", "/v1/models?limit=-1",
          "/v1/completions?stream=true", "/docs", "/openapi.json", "/.env", "/v1/worker/../pool"]


class HostileRequests:
    """Seeded generator of hostile requests against an OpenAI endpoint serving `model`."""

    def __init__(self, seed: int, model: str = "tiny", vocab: int = 512, max_request_bytes: int = 4 * 2**20):
        self.r = random.Random(seed)
        self.model = model
        self.vocab = vocab
        self.max_request_bytes = max_request_bytes
        self.kinds: list[tuple[str, Callable[[], Case], float]] = [
            ("nesting", self.nesting, 8), ("surrogate", self.surrogate, 10), ("number", self.number, 12),
            ("null", self.null, 8), ("wrong_type", self.wrong_type, 10), ("unknown_fields", self.unknown_fields, 6),
            ("huge", self.huge, 2), ("token_ids", self.token_ids, 6), ("messages", self.messages, 6),
            ("syntax", self.syntax, 8), ("method_path", self.method_path, 8), ("content_type", self.content_type, 6),
            ("malformed_http", self.malformed_http, 8), ("valid", self.valid, 4),
        ]

    def cases(self, n: int) -> Iterator[Case]:
        weights = [w for _, _, w in self.kinds]
        for _ in range(n):
            name, make, _ = self.r.choices(self.kinds, weights)[0]
            case = make()
            case.kind = f"{name}/{case.kind}" if case.kind else name
            yield case

    # -- bodies ------------------------------------------------------------------------------------

    def _base(self, chat: bool | None = None) -> tuple[str, dict[str, Any]]:
        r = self.r
        chat = r.random() < 0.4 if chat is None else chat
        # Two small limits: a mutation that drops one still leaves a short answer.
        body: dict[str, Any] = {"model": self.model, "max_tokens": r.randint(1, 3), "max_completion_tokens": 2,
                                "temperature": r.choice([0, 0.7, 1.0])}
        if r.random() < 0.3:
            body["stream"] = True
            if r.random() < 0.5:
                body["stream_options"] = {"include_usage": True}
        text = r.choice(["Hi", "hello world", "the dog", "x", "Bonjour à tous", "数字 and 😀"])
        if chat:
            body["messages"] = [{"role": "user", "content": text}]
            return "/v1/chat/completions", body
        body["prompt"] = text
        return "/v1/completions", body

    def _json(self, path: str, body: dict[str, Any], kind: str = "", hole: str | None = None) -> Case:
        text = json.dumps(body, ensure_ascii=self.r.random() < 0.5)
        if hole is not None:
            text = text.replace(f'"{_HOLE}"', hole, 1)
        return Case(kind, path=path, body=text.encode())

    def _field_path(self, body: dict[str, Any]) -> list[Any]:
        """A place to put a value: a top-level field, or one inside messages/stream_options."""
        r = self.r
        options = [["prompt"] if "prompt" in body else ["messages", 0, "content"], ["model"], ["stop"], ["user"],
                   ["meta"], ["stream_options"], ["stream_options", "include_usage"], ["seed"], ["max_tokens"]]
        if "messages" in body:
            options += [["messages", 0, "role"], ["messages", 0, "name"], ["messages"]]
        return r.choice(options)

    @staticmethod
    def _put(body: dict[str, Any], where: list[Any], value: Any) -> None:
        """Set body[where[0]][where[1]]... = value, making the containers on the way."""
        node: Any = body
        for key, next_key in zip(where, where[1:]):
            if isinstance(node, list):
                while len(node) <= key:
                    node.append(None)
            wanted = list if isinstance(next_key, int) else dict
            if not isinstance(node[key] if isinstance(node, list) else node.get(key), wanted):
                node[key] = wanted()
            node = node[key]
        if isinstance(node, list):
            while len(node) <= where[-1]:
                node.append(None)
        node[where[-1]] = value

    def nesting(self) -> Case:
        r = self.r
        path, body = self._base()
        depth = r.choice([65, 100, 999, 1001, 2000, 20000])
        opener, closer = r.choice([("[", "]"), ('{"a":', "}"), ('[{"b":', "}]")])
        deep = opener * depth + r.choice(["1", '"x"', "null", "[]"]) + closer * depth
        if r.random() < 0.2:
            deep = opener * depth  # never closed
        self._put(body, self._field_path(body), _HOLE)
        return self._json(path, body, f"depth {depth}", deep)

    def surrogate(self) -> Case:
        r = self.r
        path, body = self._base()
        lone = r.choice(["\\ud800", "\\udfff", "\\uDBFF", "\\udc00x", "a\\ud83d", "\\ude00\\ud83d", "\\ud800\\ud800"])
        if r.random() < 0.15:
            text = json.dumps(body)[:-1] + f', "k{lone}": "value"}}'
            return Case("in a key", path=path, body=text.encode())
        where = r.choice([self._field_path(body), ["stop", 0]])
        self._put(body, where, _HOLE)
        return self._json(path, body, ".".join(map(str, where)), f'"x{lone}"')

    def number(self) -> Case:
        r = self.r
        path, body = self._base()
        name = r.choice(_NUMBERS)
        text = r.choice(_NUMBER_TEXTS)
        body[name] = _HOLE
        return self._json(path, body, f"{name}={text[:20]}", text)

    def null(self) -> Case:
        r = self.r
        path, body = self._base()
        names = r.sample(_OPTIONAL, r.randint(1, 5))
        if "max_tokens" in names and "max_completion_tokens" in names:
            names.remove("max_tokens")  # keep the answer short
        for name in names:
            body[name] = None
        if r.random() < 0.3:
            body["stream_options"] = {"include_usage": None}
        if "messages" in body and r.random() < 0.3:
            body["messages"][0]["name"] = None
        return self._json(path, body, ",".join(names))

    def wrong_type(self) -> Case:
        r = self.r
        path, body = self._base()
        where = r.choice([[f] for f in ("model", "prompt", "messages", "stream", "stop", "seed", "temperature", "n",
                                        "echo", "ignore_eos", "stream_options", "max_tokens", "top_p")]
                         + [self._field_path(body)])
        if where == ["prompt"] and "prompt" not in body:
            where = ["messages"]
        self._put(body, where, r.choice(_WRONG_TYPES))
        return self._json(path, body, ".".join(map(str, where)))

    def unknown_fields(self) -> Case:
        r = self.r
        path, body = self._base()
        for _ in range(r.randint(1, 8)):
            key = r.choice(["user", "logit_bias", "__proto__", "constructor", "", "a" * 1000, "\u0000", "x.y", "n ",
                            "tools", "response_format", "metadata", "\u202e", "0", "🔥"])
            body[key] = r.choice([None, 1, "x", [1, 2], {"a": {"b": [None]}}, "\u0000" * 10, 10**20, -1.5,
                                  {"": ""}, ["\ufffd"] * 50])
        return self._json(path, body, f"{len(body)} fields")

    def huge(self) -> Case:
        r = self.r
        path, body = self._base()
        size = r.choice([100_000, 300_000, 1_000_000, 3_000_000, self.max_request_bytes + 1000])
        where = r.choice([["prompt"] if "prompt" in body else ["messages", 0, "content"], ["model"], ["stop"],
                          ["meta"], ["messages"]])
        if where == ["messages"]:
            body["messages"] = [{"role": "user", "content": "m"}] * (size // 32)
        else:
            self._put(body, where, r.choice(["dog ", "x", "é", "😀", "\\"]) * (size // 4))
        return self._json(path, body, f"{'.'.join(map(str, where))} ~{size} bytes")

    def token_ids(self) -> Case:
        r = self.r
        _, body = self._base(chat=False)
        body["prompt"] = r.choice([[-1], [self.vocab], [10**12], [2**64], [1] * 1024, [1] * 5000, [1.5], [True],
                                   ["a"], [[1, 2], [3]], [[]], [], [[-1]], [1, None], [0] * 1023, [2**63 - 1],
                                   list(range(self.vocab - 3, self.vocab + 1))])
        return self._json("/v1/completions", body, f"{json.dumps(body['prompt'])[:30]}")

    def messages(self) -> Case:
        r = self.r
        _, body = self._base(chat=True)
        body["messages"] = r.choice([
            [], [[]], [None], [{}], [{"role": "root", "content": "x"}], [{"role": "", "content": "x"}],
            [{"role": "user"}], [{"role": "user", "content": 5}], [{"role": "user", "content": [{"type": "text"}]}],
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
            [{"role": "user", "content": [{"type": "text", "text": ["a"]}]}], [{"role": "user", "content": []}],
            [{"role": "tool", "content": None}], [{"role": "assistant", "content": "a"}] * 50,
            [{"role": "user", "content": "{{ raise_exception('x') }}{% for x in range(10**9) %}{% endfor %}"}],
            [{"role": "user", "content": "x", "tool_calls": [{"id": 1}]}], "hello", {"role": "user"},
        ])
        return self._json("/v1/chat/completions", body, json.dumps(body["messages"])[:40])

    def syntax(self) -> Case:
        r = self.r
        path, body = self._base()
        good = json.dumps(body).encode()
        variants = {
            "empty": b"", "truncated": good[: r.randint(1, len(good) - 1)], "trailing": good + b" garbage",
            "bom": b"\xef\xbb\xbf" + good, "utf16": json.dumps(body).encode("utf-16"), "array": b"[" + good + b"]",
            "null": b"null", "number": b"1", "string": b'"x"', "comment": good[:-1] + b" /* c */}",
            "single_quotes": good.replace(b'"', b"'"), "bad_utf8": good[:-1] + b', "x": "\xff\xfe"}',
            "duplicate_keys": good[:-1] + b', "model": "other"}', "nul": good + b"\x00",
            "control_char": good[:-1] + b', "x": "a\x01b"}', "bad_escape": good[:-1] + b', "x": "\\q"}',
            "short_unicode_escape": good[:-1] + b', "x": "\\u12"}', "whitespace": b" \t\n " + good + b"\n\n",
        }
        name = r.choice(sorted(variants))
        return Case(name, path=path, body=variants[name])

    def method_path(self) -> Case:
        r = self.r
        method = r.choice(_METHODS)
        path = r.choice(_PATHS + ["/v1/completions", "/v1/chat/completions", "/v1/models", "/health"])
        body = self._json(*self._base()).body if r.random() < 0.5 else None
        headers = {"content-type": JSON} if body is not None else {}
        if method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            path = "/v1/completionz"
        return Case(f"{method} {path[:40]}", method=method, path=path, headers=headers, body=body)

    def content_type(self) -> Case:
        r = self.r
        case = self._json(*self._base())
        ct = r.choice(_CONTENT_TYPES)
        case.headers = {} if ct is None else {"content-type": ct}
        case.kind = repr(ct)
        return case

    def malformed_http(self) -> Case:
        r = self.r
        good = json.dumps(self._base(chat=False)[1]).encode()
        n = len(good)
        variants = {
            "garbage": bytes(r.randrange(256) for _ in range(r.randint(1, 200))) + b"\r\n\r\n",
            "no_version": b"GET /v1/models\r\n\r\n",
            "bad_version": b"GET /v1/models HTTP/9.9\r\nHost: x\r\n\r\n",
            "http2_preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "lower_method": b"get /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
            "unknown_method": b"FOO /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            "header_no_colon": b"GET /v1/models HTTP/1.1\r\nHost: x\r\nBadHeader\r\n\r\n",
            "header_space_name": b"GET /v1/models HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
            "header_ctl": b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX: a\x01b\r\n\r\n",
            "huge_header": b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX: " + b"a" * r.choice([70_000, 1_000_000])
                           + b"\r\n\r\n",
            "many_headers": b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 5000 + b"\r\n",
            "negative_length": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Content-Length: -1\r\n\r\n" + good,
            "text_length": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n" + good,
            "two_lengths": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\nContent-Length: 5\r\n\r\n" % n + good,
            "short_body": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % (n + 100) + good,
            "bad_chunk": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\nzz\r\n" + good + b"\r\n0\r\n\r\n",
            "chunk_and_length": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "nul_in_path": b"GET /v1/\x00models HTTP/1.1\r\nHost: x\r\n\r\n",
            "space_in_path": b"GET /v1/ models HTTP/1.1\r\nHost: x\r\n\r\n",
            "lone_cr": b"GET /v1/models HTTP/1.1\rHost: x\r\r\r",
            "partial": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le",
            "websocket": b"GET /v1/models HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            "h2c_upgrade": b"GET /v1/models HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                           b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
            "expect_continue": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % n + good,
            "pipelined": b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n" * 3 + b"BAD\r\n\r\n",
        }
        name = r.choice(sorted(variants))
        return Case(name, raw=variants[name])

    def valid(self) -> Case:
        return self._json(*self._base(), "served")

    # -- the prefill worker's own route ------------------------------------------------------------

    def prefill_cases(self, n: int) -> Iterator[Case]:
        """Invalid `POST /internal/prefill` bodies (never a valid one: a served prefill holds its
        blocks for a lease no client reads)."""
        r = self.r
        for _ in range(n):
            ids = r.choice([[-1], [self.vocab], [10**12], [2**64], [1] * 1024, [1] * 3000, [], [1.5], ["a"], None,
                            [[1]], [1, -1], [True, self.vocab * 2]])
            body: dict[str, Any] = {"request_id": r.choice(["r", "", "x" * 10_000, 5, None]), "prompt_token_ids": ids}
            if r.random() < 0.3:
                body["kv_transfer_params"] = r.choice([{"do_remote_decode": False}, [], "x", {"a": [[[]]]}])
            if r.random() < 0.2:
                body["layout_fingerprint"] = r.choice(["wrong", 5, ""])
            case = Case("prefill", path="/internal/prefill", body=json.dumps(body).encode())
            if r.random() < 0.2:
                case = self.nesting()
                case.path, case.kind = "/internal/prefill", "prefill/nesting"
            elif r.random() < 0.1:
                case.headers = {"content-type": "text/plain"}
            yield case


# -- sending them ---------------------------------------------------------------------------------

def drive(base_url: str, cases: list[Case], *, timeout_s: float = 30.0, concurrency: int = 4) -> list[Outcome]:
    """Send every case to `base_url` (a few at a time); one Outcome per case, in order."""
    with httpx.Client(base_url=base_url, timeout=timeout_s, limits=httpx.Limits(max_connections=concurrency)) as c:
        def one(case: Case) -> Outcome:
            return _send_raw(base_url, case, timeout_s) if case.raw is not None else _send(c, case)

        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(one, cases))


def _send(client: httpx.Client, case: Case) -> Outcome:
    start = time.monotonic()
    try:
        # The path as given, not normalized (httpx would resolve `..` and re-quote).
        url = client.base_url.copy_with(raw_path=quote(case.path, safe="/?=&[]%:@!$'()*+,;").encode())
        with client.stream(case.method, url, headers=case.headers, content=case.body) as r:
            body = r.read()
        return Outcome(case, r.status_code, r.headers.get("content-type", ""), body,
                       seconds=time.monotonic() - start)
    except httpx.TimeoutException:
        return Outcome(case, None, timed_out=True, seconds=time.monotonic() - start)
    except httpx.HTTPError as e:
        # The server closed without an answer: recorded as no status; `problems` decides.
        return Outcome(case, None, body=repr(e).encode(), seconds=time.monotonic() - start)


def _send_raw(base_url: str, case: Case, timeout_s: float) -> Outcome:
    parts = urlsplit(base_url)
    start = time.monotonic()
    answer = b""
    timed_out = False
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=timeout_s) as s:
            try:
                s.sendall(case.raw or b"")
                s.shutdown(socket.SHUT_WR)  # the request is all there is: the server sees the end
            except OSError:
                pass  # it answered and closed before taking every byte
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                answer += chunk
    except socket.timeout:
        timed_out = True
    except OSError:
        pass  # reset: the server dropped the connection
    status = None
    head, _, body = answer.partition(b"\r\n\r\n")
    if answer.startswith(b"HTTP/1."):
        status = int(head.split(b" ", 2)[1])
    ctype = next((line.split(b":", 1)[1].strip().decode("latin-1") for line in head.split(b"\r\n")[1:]
                  if line.lower().startswith(b"content-type:")), "")
    return Outcome(case, status, ctype, body, timed_out=timed_out, seconds=time.monotonic() - start)


def problems(o: Outcome, *, raw_bodies_may_be_plain: bool) -> list[str]:
    """What this outcome breaks. Malformed HTTP answered by a uvicorn we do not configure (the
    Serve proxy's) may be text/plain: `raw_bodies_may_be_plain` allows that, nothing else."""
    if o.timed_out:
        return [f"no answer in time ({o.seconds:.1f} s)"]
    if o.status is None:
        # No status line: only a connection the server may drop (raw bytes, a body it refused
        # before reading all of it).
        return [] if o.case.raw is not None else [f"no answer: {o.body[:200]!r}"]
    if o.status >= 500:
        return [f"HTTP {o.status}: {o.body[:300]!r}"]
    if o.status >= 400:
        if o.case.method == "HEAD":
            return []
        if o.case.raw is not None and raw_bodies_may_be_plain and not o.content_type.startswith(JSON):
            # uvicorn's own answer to what is not HTTP.
            return [] if o.status == 400 else [f"raw answer {o.status} {o.content_type}: {o.body[:200]!r}"]
        return _error_body_problems(o)
    if o.content_type.startswith("text/event-stream"):
        return _stream_problems(o.body)
    return []


def _error_body_problems(o: Outcome) -> list[str]:
    if not o.content_type.startswith(JSON):
        return [f"HTTP {o.status} with {o.content_type or 'no content type'}: {o.body[:200]!r}"]
    try:
        err = json.loads(o.body)["error"]
    except (ValueError, KeyError, TypeError):
        return [f"HTTP {o.status} body is not OpenAI's: {o.body[:200]!r}"]
    if not isinstance(err, dict) or set(err) != ERROR_KEYS or not err["message"] or not err["type"]:
        return [f"HTTP {o.status} error is not OpenAI's shape: {err!r:.200}"]
    return []


def _stream_problems(body: bytes) -> list[str]:
    events = [line[6:] for line in body.decode("utf-8", "replace").splitlines() if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return [f"stream does not end with [DONE]: {events[-2:]!r:.300}"]
    out = []
    for event in events[:-1]:
        data = json.loads(event)
        if "error" in data:
            err = data["error"]
            if set(err) != ERROR_KEYS:
                out.append(f"error event is not OpenAI's shape: {err!r:.200}")
            elif str(err["code"]).startswith("5"):
                out.append(f"5xx error event: {err!r:.300}")
    return out
