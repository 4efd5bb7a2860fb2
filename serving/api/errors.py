"""OpenAI error objects: {"error": {"message", "type", "param", "code"}} with the right status.

Bad input is always 4xx: the openai client retries 5xx, which would resend a request that can
never succeed.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_validation_error(exc: ValidationError) -> APIError:
    """The first problem pydantic found, worded for an API user."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int) or err["loc"].index(p) > 0)
    # A model's cross-field rule has no location: the field it names comes with its error (schemas.RuleError).
    param = str(err["loc"][0]) if err["loc"] else getattr(err.get("ctx", {}).get("error"), "param", None)
    if err["type"] == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {loc}", param=param)
    if err["type"] == "missing":
        return bad_request(f"Missing required parameter: '{loc}'.", param=param, code="missing_required_parameter")
    message = err["msg"].removeprefix("Value error, ")
    return bad_request(f"Invalid value for '{loc}': {message}" if loc else message, param=param, code="invalid_value")
