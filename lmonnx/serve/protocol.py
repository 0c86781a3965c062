"""What ``lmonnx serve`` speaks: its request bodies, its error answers and its JSON.

Imports nothing of the HTTP app or its routes (vLLM's ``protocol.py``), so the app
(:mod:`lmonnx.serve.app`) and the OpenAI routes (:mod:`lmonnx.serve.openai_routes`) build on
it.  lmonnx's errors are ``{"error": {"type": ..., "message": ...}}`` with their status (a
malformed body: 400 when it is not JSON, 422 for a value of the wrong type or out of range);
the OpenAI routes answer in OpenAI's shape (:func:`openai_error_response`).  JSON is strict
(NaN and infinities as ``null``, UTF-8 as is).
"""

from __future__ import annotations

from typing import Optional

from fastapi.responses import JSONResponse
from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr,
                      model_validator)

from lmonnx.strict_json import json_pieces, json_text


class ApiError(Exception):
    """An answer other than 200: ``status``, a machine-readable ``kind`` and one line;
    ``param``: the request field at fault, where known (OpenAI's answers name it)."""

    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None, *,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.headers, self.param = status, kind, headers, param


def error_response(status: int, kind: str, message: str, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status,
                        headers=headers)


OPENAI_INVALID = "invalid_request_error"
"""OpenAI's error type for a malformed request (status 400, as OpenAI and vLLM answer it)."""


def openai_error_response(err: ApiError) -> JSONResponse:
    """``err`` as OpenAI answers errors: ``{"error": {"message", "type", "param", "code"}}``;
    a malformed request (400 or 422 here) is 400 ``invalid_request_error``, as OpenAI and
    vLLM answer it."""
    status, kind = err.status, err.kind
    if status in (400, 422):
        status, kind = 400, OPENAI_INVALID
    return JSONResponse({"error": {"message": str(err), "type": kind, "param": err.param,
                                   "code": None}}, status_code=status, headers=err.headers)


def validation_error(exc) -> ApiError:
    """FastAPI's or pydantic's validation errors as one answer: 400 for a body that is not
    JSON, 422 for a value of the wrong type or out of range (the first errors, located)."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return ApiError(400, "invalid_json",
                        f"the request body is not valid JSON: {detail}".rstrip(": "))

    def where(error) -> str:
        return ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"

    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return ApiError(422, "invalid_request", "; ".join(
        f"{where(e)}: {e.get('msg', 'invalid')}" for e in errors[:3]) + more,
        param=where(first) if errors else None)


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


class RescoreUtterance(RequestBody):
    hypotheses: list[StrictStr] = Field(min_length=1)
    am_scores: list[float] = Field(min_length=1)


class RescoreBody(RequestBody):
    utterances: list[RescoreUtterance] = Field(min_length=1)
    alpha: float = Field(0.5, ge=0)
    beta: float = 0.0


def json_body(content) -> bytes:
    """JSON as ``lmonnx evaluate`` writes it: NaN and infinities as null, UTF-8 as is."""
    return json_text(content).encode("utf-8")


def large_json_body(content) -> bytes:
    """:func:`json_body` of a large answer, built on a worker thread: encoded in pieces
    (:func:`~lmonnx.strict_json.json_pieces`), so that the event loop gets the GIL between
    them."""
    return "".join(json_pieces(content)).encode("utf-8")


class StrictJSONResponse(JSONResponse):
    """A response of :func:`json_body`."""

    def render(self, content) -> bytes:
        return json_body(content)


__all__ = ["ApiError", "error_response", "openai_error_response", "OPENAI_INVALID",
           "validation_error", "RequestBody",
           "ScoreBody", "PredictBody", "GenerateBody", "StatesBody", "StepItem", "StepBody",
           "RescoreUtterance", "RescoreBody",
           "json_body", "large_json_body", "StrictJSONResponse"]
