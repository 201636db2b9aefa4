"""Request bodies as the edge accepts them, before any model reads them: the JSON media type,
UTF-8, a bounded nesting depth, no non-finite numbers, and strings that encode (no lone UTF-16
surrogates). Anything else is a 4xx with OpenAI's error body. The Router, the workers' endpoints
and the EPP's tokenizing reader all parse through `parse_json`."""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec

from disagg.openai.errors import APIError

# Deeper than any OpenAI body needs (tool schemas nest a dozen levels), far below the C parser's
# recursion limit: 2,000 levels raised RecursionError (a 500) from json.loads.
MAX_DEPTH = 64

# A \uD800-\uDFFF escape somewhere in the text: only then can json.loads build a lone surrogate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_json_content_type(content_type: str | None) -> None:
    """POST bodies must say they are JSON (415 otherwise): a browser page cannot send
    `application/json` cross-origin without a CORS preflight, which we never grant."""
    media, _, params = (content_type or "").partition(";")
    if media.strip().lower() != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {shorten(content_type or 'none')!r}",
                       code="unsupported_media_type")
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise APIError(415, f"the JSON body must be UTF-8, got charset {shorten(value.strip())!r}",
                           code="unsupported_media_type")


def parse_json(body: bytes, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """The body as a JSON object, or a 400 that says what is wrong with it (and names the
    field for a string that does not encode).

    msgspec parses (0.07 ms for a 220 KB prompt; json.loads and the surrogate scan it needs took
    0.23 ms): it refuses lone surrogates, invalid UTF-8, NaN and Infinity itself. What it refuses
    goes to json.loads, which words the 400, or accepts what msgspec cannot represent (1e400, an
    integer past 64 bits and a few digits)."""
    try:
        data = msgspec.json.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        data = _parse_refused(body, max_depth)
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    if depth(data, max_depth) > max_depth:
        raise APIError(400, f"request body is nested deeper than {max_depth} levels")
    return data


def _parse_refused(body: bytes, max_depth: int) -> Any:
    """A body msgspec refused, read by json.loads: the 400 that says why, or the value."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not valid UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:  # the C parser's own bound (about 1,000 levels): never a 500
        raise APIError(400, f"request body is nested deeper than {max_depth} levels") from None
    except ValueError as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if _SURROGATE_ESCAPE.search(text):
        where = lone_surrogate_path(data)
        if where is not None:
            path, char = where
            raise APIError(400, f"{path or 'body'}: invalid string: lone UTF-16 surrogate \\u{ord(char):04x} "
                                f"(a surrogate must be one half of a pair)", param=path or None)
    return data


def nesting_depth(body: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest (brackets in strings do not count)."""
    return depth(json.loads(body))


def depth(value: Any, stop_past: int | None = None) -> int:
    """How deep a parsed JSON value's arrays and objects nest (walked, not recursed; stops once
    past `stop_past`). Counted on the parsed value: scanning the text for brackets outside strings
    cost six times the parse itself on a 220 KB prompt."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        level += 1
        deepest = max(deepest, level)
        if stop_past is not None and deepest > stop_past:
            return deepest
        stack.extend((child, level) for child in item if isinstance(child, (dict, list)))
    return deepest


def lone_surrogate_path(data: Any) -> tuple[str, str] | None:
    """The dotted path of the first string (value or key) holding a lone surrogate, and that
    surrogate; None when every string encodes."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            hit = _SURROGATE.search(value)
            if hit:
                return path, hit.group()
        elif isinstance(value, dict):
            for key, item in value.items():
                hit = _SURROGATE.search(key)
                sub = f"{path}.{_safe(key)}" if path else _safe(key)
                if hit:
                    return sub, hit.group()
                stack.append((sub, item))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}", item) for i, item in enumerate(value))
    return None


def shorten(text: str, limit: int = 80) -> str:
    """User input quoted in an error message: bounded, and always encodable."""
    text = _SURROGATE.sub("\ufffd", text)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _safe(key: str) -> str:
    return shorten(key, 40)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")
