"""OpenAI / vLLM-compatible routes of ``lmonnx serve``, for clients and evaluation harnesses
that speak the legacy completions API (the ``openai`` package, lm-evaluation-harness's
``local-completions`` with ``tokenizer_backend=remote``)::

    GET  /v1/models            the one model (id = the service's name, with max_model_len)
    GET  /v1/models/{id}
    POST /v1/completions       score (echo + logprobs, max_tokens 0) and/or generate
    GET  /tokenizer_info       vLLM's: bos/eos/pad/unk tokens, model_max_length
    POST /tokenize             {"prompt": text} -> {"tokens": [...], "count", "max_model_len"}
    POST /detokenize           {"tokens": [...]} -> {"prompt": text}

Tokens are the model's words (ids: 0 pad, 1 ``<unk>``, 2 ``<s>``, 3 ``</s>``, 4.. words).
Text is tokenized as sentences are (the model's tokenizer preset), except that a literal
``<s>`` or ``</s>`` is that special token (as a Hugging Face tokenizer reads its special
tokens); text is never given a ``<s>`` unless asked (``add_special_tokens``), so a text
prompt and its token ids are read alike.  Token ids are detokenized as words joined by one
space.

How a prompt is scored (log-probabilities in nats; the LM always starts from ``<s>``):

* The first token has no log-probability (null), as in OpenAI's and vLLM's answers.  If it
  is ``<s>`` or ``</s>`` (lm-eval's rolling loglikelihood puts the tokenizer's BOS there) it
  only marks the sentence start; otherwise it is the sentence's first word, read after
  ``<s>``.  Either way every later token ``t_i`` gets log p(t_i | <s>, the words before it).
* ``</s>`` later in a prompt ends the sentence: it is scored as the end of the sentence
  (what ``Scorer.full_scores`` scores last) and the next token starts a new sentence from a
  fresh ``<s>``.  ``<s>`` is allowed only first; padding (id 0) never.
* Generation continues the last (open) sentence by stepping its state; drawing ``</s>``
  ends the choice (finish_reason "stop", the token listed, no text) -- a prompt that ends
  with ``</s>`` therefore generates a new sentence.

So ``"<s> the cat </s>"`` with echo, logprobs and max_tokens 0 gives, after the null, exactly
``Scorer.full_scores("the cat")``.  All onnxruntime work runs on the service's compute thread:
a prompt one window of one sentence per turn (:class:`PromptRun`, windows of the service's one
token budget that carry the LSTM state), each choice's generation a turn of its own.

Errors are OpenAI's: ``{"error": {"message", "type", "param", "code"}}``; a malformed request
(a value of the wrong type, an unsupported field, a bad token id, a body that is not JSON) is
400 ``invalid_request_error``, as OpenAI and vLLM answer it; another ``model`` 404.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Optional, Union

import numpy as np
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.routing import APIRoute
from pydantic import ConfigDict, Discriminator, Field, StrictBool, StrictInt, StrictStr, Tag

from lmonnx.incremental import Incremental, LMState, next_token_ids, state_from_logits
from lmonnx.serve.protocol import OPENAI_INVALID, ApiError, RequestBody, large_json_body
from lmonnx.serve.service import ScoringService, off_loop_if_large, tokenize_off_loop
from lmonnx.validation import check_real
from lmonnx.vocab import BOS_ID, EOS_ID, PAD_ID, Vocabulary
from lmonnx.windows import CarriedWindows
from lmonnx.xent import token_nll_and_hits

MAX_MODEL_LEN = 1 << 20
"""Tokens a prompt plus its completion may hold: an LSTM has no context limit, but a
request must be bounded (a 1M-token prompt is ~6 MB of JSON, the body limit's order)."""
MAX_LOGPROBS = 20  # top log-probabilities per position, vLLM's default cap
MAX_COMPLETION_TOKENS = 10_000  # what /v1/generate allows
_SPECIALS = {"<s>": BOS_ID, "</s>": EOS_ID}
_SPECIAL_SPLIT = re.compile(r"(<s>|</s>)")
_BOUNDARIES = (BOS_ID, EOS_ID)


def invalid(message: str, param: str | None = None) -> ApiError:
    """A malformed request: 400 ``invalid_request_error``, as OpenAI and vLLM answer it."""
    return ApiError(400, OPENAI_INVALID, message, param=param)


class OpenAIRoute(APIRoute):
    """A route of the OpenAI dialect: the app answers its errors in OpenAI's shape, a
    malformed request with 400 (:func:`~lmonnx.serve.protocol.openai_error_response`)."""


# ---- tokenizer: text <-> token ids -------------------------------------------------------

def tokenize(vocab: Vocabulary, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of ``text``: words as the model's tokenizer splits and encodes them (OOV ->
    ``<unk>``), a literal ``<s>`` / ``</s>`` as that special token.  ``add_special_tokens``
    puts ``<s>`` first unless the text already starts with a sentence boundary."""
    ids: list[int] = []
    for piece in _SPECIAL_SPLIT.split(text):
        if piece in _SPECIALS:
            ids.append(_SPECIALS[piece])
        elif piece:
            ids.extend(vocab.encode_words(vocab.words(piece)).tolist())
    if add_special_tokens and (not ids or ids[0] not in _BOUNDARIES):
        ids.insert(0, BOS_ID)
    return ids


def check_token_ids(vocab: Vocabulary, ids: list[int], what: str = "prompt") -> None:
    """400 for an id outside the vocabulary, padding anywhere, ``<s>`` anywhere but first."""
    for i, token in enumerate(ids):
        if not 0 <= token < len(vocab):
            raise invalid(f"{what}: token id {token} at position {i} is outside the "
                          f"vocabulary [0, {len(vocab)})", "prompt")
        if token == PAD_ID:
            raise invalid(f"{what}: token id 0 (padding) at position {i} is never part of a "
                          "text", "prompt")
        if token == BOS_ID and i > 0:
            raise invalid(f"{what}: token id {BOS_ID} (<s>) at position {i}: <s> may only be "
                          "the first token (</s> ends a sentence and starts the next)",
                          "prompt")


def detokenize(vocab: Vocabulary, ids: list[int]) -> str:
    """The text of token ids: their words (special tokens as written) joined by one space."""
    for i, token in enumerate(ids):
        if not 0 <= token < len(vocab):
            raise invalid(f"tokens: token id {token} at position {i} is outside the "
                          f"vocabulary [0, {len(vocab)})", "tokens")
    return " ".join(vocab.decode(ids)) if ids else ""


def _prompt_form(value) -> str | None:
    """Which of OpenAI's four prompt forms ``value`` is meant to be (pydantic then checks it
    strictly as that form); None: none of them."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, list) and value:
        first = value[0]
        if isinstance(first, str):
            return "texts"
        if isinstance(first, int):  # a bool is refused by StrictInt, located
            return "ids"
        if isinstance(first, list):
            return "id_lists"
    return None


Prompt = Annotated[
    Union[Annotated[StrictStr, Tag("text")],
          Annotated[list[StrictStr], Tag("texts")],
          Annotated[list[StrictInt], Tag("ids")],
          Annotated[list[list[StrictInt]], Tag("id_lists")]],
    Discriminator(_prompt_form, custom_error_type="invalid_prompt",
                  custom_error_message="must be a string, a non-empty list of strings, a list "
                                       "of token ids or a list of token-id lists")]
"""OpenAI's (and vLLM's) prompt: ``str | list[str] | list[int] | list[list[int]]``, strict
(no ``"1"`` for 1, no ``true`` for 1); a list is not empty."""


def prompt_token_lists(vocab: Vocabulary, prompt: Prompt, add_special_tokens: bool,
                       ) -> list[list[int]]:
    """The prompts of a completion request as token-id lists, checked (:func:`check_token_ids`):
    ``prompt`` is a text, a list of texts, a list of token ids or a list of token-id lists
    (validated as :data:`Prompt`)."""
    if isinstance(prompt, str):
        prompts = [tokenize(vocab, prompt, add_special_tokens)]
    elif isinstance(prompt[0], str):
        prompts = [tokenize(vocab, p, add_special_tokens) for p in prompt]
    elif isinstance(prompt[0], int):
        prompts = [list(prompt)]
    else:
        prompts = [list(p) for p in prompt]
    for i, ids in enumerate(prompts):
        check_token_ids(vocab, ids, "prompt" if len(prompts) == 1 else f"prompt {i}")
    return prompts


# ---- scoring a prompt (on the compute thread) ---------------------------------------------

@dataclass
class ScoredPrompt:
    """A prompt's per-token log-probabilities in nats (None first) and, with ``top_k``, each
    position's likeliest tokens as ``(id, logprob)`` (None first); ``state``: the open last
    sentence's state, where generation goes on."""

    logprobs: list
    top: list | None
    state: LMState


def _sentences(ids: list[int]) -> list[tuple[int, list[int], bool]]:
    """``(prompt index of its first word, word ids, ended by </s>)`` of each sentence of a
    prompt, the last one open.  A leading boundary token belongs to no sentence."""
    first = 1 if ids and ids[0] in _BOUNDARIES else 0
    sentences, words = [], []
    for i in range(first, len(ids)):
        if ids[i] == EOS_ID:
            sentences.append((first, words, True))
            first, words = i + 1, []
        else:
            words.append(ids[i])
    sentences.append((first, words, False))
    return sentences


def _top_of_rows(logits: np.ndarray, lse: np.ndarray, k: int, candidates: np.ndarray,
                 ) -> list[list[tuple[int, float]]]:
    """The ``k`` likeliest candidate tokens of each row of float32 ``logits`` [T, V] as
    ``(id, logprob)``, best first; ``lse`` float64 [T]: each row's log-sum-exp."""
    scores = logits[:, candidates]
    k = min(k, scores.shape[1])
    if k == 0:
        return [[] for _ in range(len(logits))]
    best = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # the k best, unordered
    rows = []
    for t, picked in enumerate(best):
        picked = picked[np.argsort(-scores[t, picked], kind="stable")]
        rows.append([(int(candidates[j]), float(scores[t, j]) - float(lse[t])) for j in picked])
    return rows


class PromptRun:
    """A prompt scored one window of one sentence per :meth:`step` (one onnxruntime call),
    the LSTM state carried from window to window within a sentence
    (:class:`~lmonnx.windows.CarriedWindows`): a server runs each step as a turn of its
    compute thread (``ScoringService.run_steps``), so a long prompt never holds the other
    callers.  Target log-probabilities come from the evaluator's kernel
    (``Scorer.full_scores``'s numbers); :meth:`scored` once :attr:`done` (see the module's
    docstring for the conventions)."""

    def __init__(self, incremental: Incremental, ids: list[int], window: int,
                 top_k: int | None):
        self.session, self.window, self.top_k = incremental.session, window, top_k
        self._candidates = next_token_ids(len(incremental.vocab))
        self.logprobs: list = [None] * len(ids)
        self.top: list | None = [None] * len(ids) if top_k is not None else None
        self._nonempty = bool(ids)
        # An empty open last sentence is the state after <s>: shared, already computed.
        self._state = incremental.begin()
        self._sentences = _sentences(ids)  # the last one is open: it sets the state
        self._next = 0  # the next sentence's index
        self._windows: CarriedWindows | None = None
        self._next_sentence()

    def _next_sentence(self) -> None:
        """Start the next sentence that needs onnxruntime (one with a target), if any."""
        self._windows = None
        while self._next < len(self._sentences):
            self._first, words, ended = self._sentences[self._next]
            self._next += 1
            if ended or words:
                self._inputs = np.array([BOS_ID, *words], np.int32)
                self._targets = np.array([*words, *([EOS_ID] if ended else [])], np.int32)
                self._windows = CarriedWindows(len(self._inputs), self.window)
                return

    @property
    def done(self) -> bool:
        return self._windows is None

    def step(self) -> None:
        """Run the next window (onnxruntime and the kernel)."""
        _, last = self._windows.step(self._run)
        if self._windows.done:
            if self._next == len(self._sentences):  # the last, open one: generation goes on
                h, c = self._windows.state
                self._state = state_from_logits(h[:, 0], c[:, 0], last, len(self._inputs) - 1)
            self._next_sentence()

    def _run(self, part: slice, state):
        """One window: its targets' log-probabilities (and top rows) stored, ``(the last
        position's logits, the state after the window)`` returned."""
        logits, state = self.session.run(self._inputs[None, part], state)
        rows = logits[0, :max(0, min(len(self._targets), part.stop) - part.start)]
        if len(rows):
            labels = self._targets[part.start:part.start + len(rows)]
            nll, _ = token_nll_and_hits(rows, labels)
            at = self._first + part.start
            self.logprobs[at:at + len(rows)] = (-nll).tolist()
            if self.top is not None:
                lse = nll + rows[np.arange(len(rows)), labels].astype(np.float64)
                self.top[at:at + len(rows)] = _top_of_rows(rows, lse, self.top_k,
                                                           self._candidates)
        return logits[0, -1], state

    def scored(self) -> ScoredPrompt:
        """The prompt's log-probabilities, top rows and its last sentence's state."""
        if not self.done:
            raise RuntimeError("the prompt is not scored yet")
        if self._nonempty:  # the first token has no context: no log-probability, as OpenAI
            self.logprobs[0] = None
            if self.top is not None:
                self.top[0] = None
        return ScoredPrompt(self.logprobs, self.top, self._state)


# ---- generating (on the compute thread) -----------------------------------------------------

@dataclass
class Sampling:
    """How a completion is drawn: ``max_tokens`` tokens at most, ``temperature`` (0:
    greedy), ``top_k`` (None: every token), ``stop`` strings, ``logprobs`` (None: no top
    log-probabilities; k: the k likeliest tokens per position)."""

    max_tokens: int
    temperature: float
    top_k: int | None
    stop: list[str]
    logprobs: int | None


@dataclass
class Generated:
    """One choice's completion: token ids, their log-probabilities (nats), top rows, where
    each token starts in ``text`` (``</s>`` adds no text), and why it finished."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    stop_reason: str | None = None  # the stop string that ended it (vLLM's field)


def _stop_cut(text: str, searched_from: int, stop: list[str]) -> tuple[int, str] | None:
    """The first stop string found at or after ``searched_from``: ``(where it begins, the
    string)`` (the earlier one of two listed first), or None."""
    found = [(i, n) for n, s in enumerate(stop) if (i := text.find(s, searched_from)) >= 0]
    if not found:
        return None
    where, n = min(found)
    return where, stop[n]


def generate_after(service: ScoringService, state: LMState, sampling: Sampling,
                   rng: np.random.Generator, spaced: bool) -> Generated:
    """Draw tokens after ``state`` as ``Scorer.generate`` does (its sampler, its steps): up
    to ``max_tokens``, ending at ``</s>`` or at a stop string (the text is cut before it;
    the token that completed it stays listed).  ``spaced``: the first word follows text, so
    it gets a leading space as every later word does.  Runs onnxruntime."""
    incremental = service.scorer.incremental
    out = Generated()
    longest_stop = max((len(s) for s in sampling.stop), default=0)
    for n in range(sampling.max_tokens):
        if n:  # step only when another token is wanted: the last state is never used
            _, (state,) = incremental.step_ids([state], np.array([out.ids[-1]]))
        token = incremental.draw(state.logprobs, sampling.temperature, sampling.top_k, rng)
        out.ids.append(token)
        out.logprobs.append(state.logprob(token))
        if sampling.logprobs is not None:
            out.top.append(incremental.top_next(state, sampling.logprobs)
                           if sampling.logprobs else [])
        if token == EOS_ID:
            out.offsets.append(len(out.text))
            out.finish_reason = "stop"
            break
        before = len(out.text)
        out.text += (" " if out.text or spaced else "") + service.vocab.id_to_token(token)
        out.offsets.append(len(out.text) - len(service.vocab.id_to_token(token)))
        cut = _stop_cut(out.text, max(0, before - longest_stop), sampling.stop)
        if cut is not None:
            out.text, out.stop_reason = out.text[:cut[0]], cut[1]
            out.finish_reason = "stop"
            break
    return out


async def complete_prompt(service: ScoringService, ids: list[int], sampling: Sampling, n: int,
                          seed: int | None, request=None) -> tuple[ScoredPrompt, list[Generated]]:
    """A prompt scored and ``n`` completions drawn after it, with one random generator
    seeded by ``seed`` (so a prompt gives the same choices whatever its batch-mates).  Each
    window of the prompt (:class:`PromptRun`) and each completion is a turn of its own on the
    compute thread: other callers' batches run in between, so neither a long prompt nor
    ``n`` x ``max_tokens`` steps hold the server (up to 128 x 10,000 onnxruntime calls)."""
    run = PromptRun(service.scorer.incremental, ids, service.window, sampling.logprobs)
    scored = (await service.run_steps(run, request)).scored()
    rng = np.random.default_rng(seed)
    completions = []
    for _ in range(n):  # in turn: the generator's draws follow one another as before
        completions.append(await service.call(
            lambda: generate_after(service, scored.state, sampling, rng, spaced=bool(ids)),
            request=request))
    return scored, completions


# ---- request bodies --------------------------------------------------------------------------

class _OpenAIBody(RequestBody):
    # OpenAI clients send fields this server does not read (user, ...): they are ignored;
    # the ones that would change the answer are checked in _refuse_unsupported.
    model_config = ConfigDict(extra="allow")


class CompletionBody(_OpenAIBody):
    model: Optional[StrictStr] = None
    prompt: Prompt
    max_tokens: Optional[StrictInt] = Field(16, ge=0, le=MAX_COMPLETION_TOKENS)
    temperature: Optional[float] = Field(1.0, ge=0)
    top_k: Optional[StrictInt] = None
    top_p: Optional[float] = None
    n: StrictInt = Field(1, ge=1, le=128)
    best_of: Optional[StrictInt] = None
    echo: StrictBool = False
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=MAX_LOGPROBS)
    seed: Optional[StrictInt] = Field(None, ge=0)
    stop: Optional[StrictStr | list[StrictStr]] = None
    add_special_tokens: StrictBool = False
    suffix: Optional[StrictStr] = None
    stream: Optional[StrictBool] = False
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    logit_bias: Optional[dict] = None
    min_tokens: Optional[StrictInt] = None


class TokenizeBody(_OpenAIBody):
    model: Optional[StrictStr] = None
    prompt: Optional[StrictStr] = None
    messages: Optional[list] = None
    add_special_tokens: StrictBool = False
    return_token_strs: StrictBool = False


class DetokenizeBody(_OpenAIBody):
    model: Optional[StrictStr] = None
    tokens: list[StrictInt]


def _refuse_unsupported(body: CompletionBody) -> None:
    """400 for a field that would change the answer and is not implemented."""
    unsupported = [
        ("suffix", body.suffix, body.suffix not in (None, "")),
        ("stream", body.stream, bool(body.stream)),
        ("best_of", body.best_of, body.best_of not in (None, body.n)),
        ("top_p", body.top_p, body.top_p not in (None, 1)),
        ("presence_penalty", body.presence_penalty, bool(body.presence_penalty)),
        ("frequency_penalty", body.frequency_penalty, bool(body.frequency_penalty)),
        ("repetition_penalty", body.repetition_penalty,
         body.repetition_penalty not in (None, 1)),
        ("logit_bias", body.logit_bias, bool(body.logit_bias)),
        ("min_tokens", body.min_tokens, bool(body.min_tokens)),
    ]
    for name, value, given in unsupported:
        if given:
            raise invalid(f"{name}={value!r} is not supported by this server (it samples with "
                          "temperature, top_k, seed, stop and n only)", name)


def _sampling(body: CompletionBody) -> Sampling:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    top_k = body.top_k if body.top_k is not None and body.top_k > 0 else None  # vLLM: -1, 0 off
    temperature = 1.0 if body.temperature is None else check_real(
        "temperature", body.temperature, low=0)  # finite: no Infinity, as /v1/generate
    return Sampling(max_tokens=16 if body.max_tokens is None else body.max_tokens,
                    temperature=temperature,
                    top_k=top_k, stop=[s for s in stop if s], logprobs=body.logprobs)


def _check_model(service: ScoringService, model: str | None) -> None:
    if model is not None and model != service.name:
        raise ApiError(404, "not_found", f"the model {model!r} does not exist; this server "
                                         f"serves {service.name!r} (GET /v1/models)")


# ---- answers ---------------------------------------------------------------------------------

def _top_dict(vocab: Vocabulary, top: list | None, token: int, logprob: float | None):
    """A position's top log-probabilities as {token: logprob}; the position's own token is
    always there (as vLLM lists the sampled token), with its own value (so lm-eval's
    "is greedy" test compares equal numbers)."""
    if top is None:
        return None
    entries = {vocab.tokens[i]: value for i, value in top}
    entries[vocab.tokens[token]] = logprob
    return entries


def _prompt_part(vocab: Vocabulary, ids: list[int], scored: ScoredPrompt):
    """The echoed prompt: its text and its (tokens, logprobs, top, offsets)."""
    offsets, position = [], 0
    for token in ids:
        offsets.append(position)
        position += len(vocab.tokens[token]) + 1
    top = scored.top if scored.top is not None else [None] * len(ids)
    return detokenize(vocab, ids), (list(ids), scored.logprobs, top, offsets)


def _choice(vocab: Vocabulary, index: int, ids: list[int], scored: ScoredPrompt,
            generated: Generated, echo: bool, logprobs: int | None) -> dict:
    """One ``choices`` entry of a text_completion."""
    text, parts = "", ([], [], [], [])
    if echo:
        text, parts = _prompt_part(vocab, ids, scored)
    base = len(text)
    text += generated.text
    tokens = parts[0] + generated.ids
    values = parts[1] + generated.logprobs
    tops = parts[2] + generated.top  # generated.top is empty unless logprobs was asked
    offsets = parts[3] + [base + o for o in generated.offsets]
    record = None
    if logprobs is not None:
        record = {"tokens": [vocab.tokens[t] for t in tokens], "token_logprobs": values,
                  "top_logprobs": [_top_dict(vocab, top, t, v)
                                   for top, t, v in zip(tops, tokens, values)],
                  "text_offset": offsets}
    return {"text": text, "index": index, "logprobs": record,
            "finish_reason": generated.finish_reason,
            "stop_reason": generated.stop_reason}


def _model_card(service: ScoringService) -> dict:
    return {"id": service.name, "object": "model", "created": int(service.started),
            "owned_by": "lmonnx", "root": service.name, "parent": None,
            "max_model_len": MAX_MODEL_LEN, "permission": []}


async def _prompt_token_lists(service: ScoringService, body: CompletionBody) -> list[list[int]]:
    """The request's prompts as token ids, tokenized and checked on a worker thread when
    they are long (a 1M-word text would hold the event loop, and every other caller, for a
    while)."""
    items = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    size = sum(len(p) if isinstance(p, (str, list)) else 1 for p in items)
    return await off_loop_if_large(size, prompt_token_lists, service.vocab, body.prompt,
                                   body.add_special_tokens)


async def _complete(service: ScoringService, body: CompletionBody, request: Request) -> bytes:
    """The text_completion answer's JSON."""
    _check_model(service, body.model)
    _refuse_unsupported(body)
    sampling = _sampling(body)
    prompts = await _prompt_token_lists(service, body)
    for i, ids in enumerate(prompts):
        if len(ids) + sampling.max_tokens > MAX_MODEL_LEN:
            raise invalid(f"prompt {i}: {len(ids)} tokens plus max_tokens "
                          f"{sampling.max_tokens} exceed max_model_len {MAX_MODEL_LEN}", "prompt")
    done = []
    for ids in prompts:  # one prompt after another: their turns interleave with other callers
        done.append((ids, *await complete_prompt(service, ids, sampling, body.n, body.seed,
                                                 request)))
    generated_tokens = sum(len(g.ids) for _, _, completions in done for g in completions)
    prompt_tokens = sum(len(ids) for ids in prompts)

    def answer() -> bytes:
        choices = [_choice(service.vocab, i * body.n + j, ids, scored, generated, body.echo,
                           body.logprobs)
                   for i, (ids, scored, completions) in enumerate(done)
                   for j, generated in enumerate(completions)]
        return large_json_body({
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": service.name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated_tokens,
                      "total_tokens": prompt_tokens + generated_tokens}})

    # An echoed 1M-token prompt is tens of MB of JSON: built on a worker thread, not on the
    # event loop (it held every other caller for ~10 s).
    echoed = prompt_tokens * body.n if body.echo else 0
    return await off_loop_if_large((echoed + generated_tokens) * (1 + (body.logprobs or 0)),
                                   answer)


def _tokenizer_info(service: ScoringService) -> dict:
    options = service.vocab.options
    return {"tokenizer_class": "lmonnx.vocab.Vocabulary", "preset": options.preset,
            "lower": options.lower, "vocab_size": len(service.vocab),
            "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
            "unk_token": "<unk>", "add_bos_token": False,
            "model_max_length": MAX_MODEL_LEN}


def add_openai_routes(app: FastAPI, service: ScoringService) -> None:
    """The OpenAI / vLLM routes of the module's docstring, on ``app``, each an
    :class:`OpenAIRoute` (its errors are OpenAI's)."""
    router = APIRouter(route_class=OpenAIRoute)

    @router.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(service)]}

    @router.get("/v1/models/{model_id}")
    async def model(model_id: str):
        _check_model(service, model_id)
        return _model_card(service)

    @router.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        return _json(await _complete(service, body, request))

    @router.get("/tokenizer_info")
    async def tokenizer_info():
        return _tokenizer_info(service)

    @router.post("/tokenize")
    async def tokenize_text(body: TokenizeBody):
        _check_model(service, body.model)
        if body.prompt is None:
            raise invalid("chat \"messages\" are not supported (this model has no chat "
                          "template): give \"prompt\", a text" if body.messages is not None
                          else "prompt: Field required (a text)", "prompt")

        def answer() -> bytes:
            ids = tokenize(service.vocab, body.prompt, body.add_special_tokens)
            tokens = {"count": len(ids), "max_model_len": MAX_MODEL_LEN, "tokens": ids}
            if body.return_token_strs:
                tokens["token_strs"] = [service.vocab.tokens[t] for t in ids]
            return large_json_body(tokens)

        # A long text's ids and their JSON on a worker thread, not on the event loop.
        return _json(await tokenize_off_loop([body.prompt], answer))

    @router.post("/detokenize")
    async def detokenize_tokens(body: DetokenizeBody):
        _check_model(service, body.model)
        return _json(await off_loop_if_large(
            len(body.tokens), lambda: large_json_body({"prompt": detokenize(service.vocab,
                                                                            body.tokens)})))

    app.include_router(router)


def _json(body: bytes) -> Response:
    return Response(body, media_type="application/json")


__all__ = ["add_openai_routes", "OpenAIRoute", "Prompt", "PromptRun", "tokenize", "detokenize",
           "generate_after", "MAX_MODEL_LEN"]
