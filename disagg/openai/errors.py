"""OpenAI-style error bodies: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

_TYPES = {
    400: "invalid_request_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    """An error the client should see with this status and body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "invalid_request_error" if status < 500 else "internal_error"),
            "param": param,
            "code": code if code is not None else str(status),
        }
    }


def from_validation_error(err: ValidationError) -> APIError:
    """The first problem of a pydantic validation, as a 400 that names the field."""
    first = err.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ()) if not _union_member(p)) or None
    return APIError(400, f"{param}: {first.get('msg')}" if param else str(first.get("msg")), param=param)


# pydantic names the member of a union it tried (`prompt.str`, `prompt.list[int].0`): not a field.
_UNION_MEMBER = re.compile(r"str|int|float|bool|none|.*[\[\]\-].*")


def _union_member(part: Any) -> bool:
    return isinstance(part, str) and _UNION_MEMBER.fullmatch(part) is not None
