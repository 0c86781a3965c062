"""What ``lmonnx serve`` speaks: its request bodies, its error answers and its JSON.

Imports nothing of the HTTP app or its routes (vLLM's ``protocol.py``), so the app
(:mod:`lmonnx.serve.app`) and the OpenAI routes (:mod:`lmonnx.serve.openai_routes`) both build
on it without importing each other.  Errors are ``{"error": {"type": ..., "message": ...}}``
with their status; JSON is strict (NaN and infinities as ``null``, UTF-8 as is).
"""

from __future__ import annotations

from typing import Optional

from fastapi.responses import JSONResponse
from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr,
                      model_validator)

from lmonnx.strict_json import json_pieces, json_text


class ApiError(Exception):
    """An answer other than 200: ``status``, a machine-readable ``kind`` and one line."""

    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.headers = status, kind, headers


def error_response(status: int, kind: str, message: str, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status,
                        headers=headers)


def validation_error(exc) -> tuple[int, str, str]:
    """(status, type, one line) of FastAPI's or pydantic's validation errors: 400 for a body
    that is not JSON, 422 for a value of the wrong type or out of range (the first error,
    located)."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return 400, "invalid_json", f"the request body is not valid JSON: {detail}".rstrip(": ")
    def located(error) -> str:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        return f"{where}: {error.get('msg', 'invalid')}"

    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return 422, "invalid_request", "; ".join(map(located, errors[:3])) + more


# ---- request bodies: strict types (no "1" for 1, no 1 for "1"), unknown fields refused ----

class RequestBody(BaseModel):
    """A JSON request body: strict types, unknown fields refused, null as the default."""

    # NaN and Infinity are not JSON: refused as numbers, with a message that says so.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data):
        """null for a field that has a default means that default, as OpenAI's API reads
        it (clients send ``"n": null``, ``"per_token": null``); a required field stays
        required."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {key: value for key, value in data.items()
                if value is not None or key not in fields or fields[key].is_required()}


class ScoreBody(RequestBody):
    sentences: list[StrictStr] = Field(min_length=1)
    per_token: StrictBool = False


class PredictBody(RequestBody):
    prefix: StrictStr = ""
    k: StrictInt = Field(5, ge=1)


class GenerateBody(RequestBody):
    prefix: StrictStr = ""
    words: StrictInt = Field(20, ge=1, le=10_000)
    temperature: float = Field(1.0, ge=0)
    top_k: Optional[StrictInt] = Field(None, ge=1)
    seed: Optional[StrictInt] = Field(None, ge=0)


class StatesBody(RequestBody):
    prefix: StrictStr = ""


class StepItem(RequestBody):
    state: StrictStr
    word: Optional[StrictStr] = None
    end: StrictBool = False


class StepBody(RequestBody):
    steps: list[StepItem] = Field(min_length=1)


def json_body(content) -> bytes:
    """JSON as ``lmonnx evaluate`` writes it: NaN and infinities as null, UTF-8 as is."""
    return json_text(content).encode("utf-8")


def large_json_body(content) -> bytes:
    """:func:`json_body` of a large answer, built on a worker thread: encoded in pieces
    (:func:`~lmonnx.evaluate.json_pieces`), so that the event loop gets the GIL between
    them."""
    return "".join(json_pieces(content)).encode("utf-8")


class StrictJSONResponse(JSONResponse):
    """A response of :func:`json_body`."""

    def render(self, content) -> bytes:
        return json_body(content)


__all__ = ["ApiError", "error_response", "validation_error", "RequestBody",
           "ScoreBody", "PredictBody", "GenerateBody", "StatesBody", "StepItem", "StepBody",
           "json_body", "large_json_body", "StrictJSONResponse"]
