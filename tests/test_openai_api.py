"""The OpenAI / vLLM routes against lmonnx's own numbers: the official ``openai`` client and
lm-evaluation-harness's ``local-completions`` model (remote tokenizer) talk to a real uvicorn
server on a free port, serving the TensorFlow-free random model of lmonnx/_testing.py.

Conventions checked (nats throughout):
* ``<s> w1..wn </s>`` echoed with logprobs: after the null, exactly ``Scorer.full_scores``.
* lm-eval's rolling loglikelihood of a text is ``[<s>] + words`` scored minus nothing else:
  the sum of the words' log-probabilities, *without* ``</s>``; lmonnx's sentence logprob
  includes ``</s>``.  Its word count is ``len(re.split(r"\\s+", doc))``, the number of
  whitespace-separated words (the whitespace preset's word count), so
  ``word_perplexity = exp(-sum_docs(logprob - logprob(</s>)) / sum_docs(words))``.
"""

import json
import math
import re
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn

from lmonnx import Scorer
from lmonnx._testing import SOFTMAXES, build_random_lm, make_vocab, random_cutoffs
from lmonnx.serve.app import create_app
from lmonnx.serve.service import ScoringService

WORDS = [f"w{i}" for i in range(40)]
MODEL_NAME = "tiny-lstm"
SENTENCES = ["w1 w2 w3 w4", "w7 zebra w7 w9 w10 w11", "w3", "w0 w0 w0 w5 w6 w7 w8 w9 w10"]


@pytest.fixture(scope="module", params=SOFTMAXES)
def model_path(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("openai") / "model.onnx"
    build_random_lm(path, make_vocab(WORDS), units=16, layers=2, seed=5,
                    cutoffs=random_cutoffs(request.param, len(WORDS) + 4))
    return path


@pytest.fixture(scope="module")
def scorer(model_path):
    return Scorer(model_path, providers="cpu", num_threads=1)


@pytest.fixture(scope="module")
def server_url(model_path):
    """A real server (the openai client and lm-eval need a URL), in a thread.  A small
    token budget (the served scorer's window) makes every longer prompt run in several
    windows."""
    served = Scorer(model_path, providers="cpu", num_threads=1, max_tokens=4)
    service = ScoringService(served, name=MODEL_NAME)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def http(server_url):
    with httpx.Client(base_url=server_url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def openai_client(server_url):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="x", max_retries=0)


def full_logprobs(scorer, sentence):
    return [t.logprob for t in scorer.full_scores(sentence)]


# ---- the openai client ----------------------------------------------------------------------

def test_models_are_listed_with_max_model_len(openai_client, http):
    (card,) = openai_client.models.list().data
    assert card.id == MODEL_NAME and card.object == "model"
    assert card.model_dump()["max_model_len"] > 0
    assert openai_client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    assert http.get("/v1/models/other").status_code == 404


def test_echoed_sentence_scores_are_full_scores(openai_client, scorer):
    answer = openai_client.completions.create(
        model=MODEL_NAME, prompt=[f"<s> {s} </s>" for s in SENTENCES], echo=True,
        logprobs=0, max_tokens=0)
    assert answer.object == "text_completion" and len(answer.choices) == len(SENTENCES)
    for sentence, choice in zip(SENTENCES, sorted(answer.choices, key=lambda c: c.index)):
        lp = choice.logprobs
        assert lp.tokens == ["<s>", *[w if w in WORDS else "<unk>" for w in sentence.split()],
                             "</s>"]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:] == pytest.approx(full_logprobs(scorer, sentence),
                                                      rel=1e-6, abs=1e-9)
        assert choice.text == " ".join(lp.tokens) and choice.finish_reason == "length"
        assert [choice.text[o:].split(" ")[0] for o in lp.text_offset] == lp.tokens
    assert answer.usage.completion_tokens == 0


def test_stepped_scores_and_top_logprobs(openai_client, scorer):
    sentence = SENTENCES[1]
    choice = openai_client.completions.create(
        model=MODEL_NAME, prompt=f"<s> {sentence} </s>", echo=True, logprobs=3,
        max_tokens=0).choices[0]
    state, stepped = scorer.begin(), []
    words = sentence.split()
    for position, word in enumerate([*words, None], start=1):
        top = choice.logprobs.top_logprobs[position]
        expected = scorer.predict_next(" ".join(words[:position - 1]), k=3)
        listed = {w: math.exp(v) for w, v in top.items()}
        for w, probability in expected:  # the 3 likeliest, by the scorer's own states
            assert listed[w] == pytest.approx(probability, rel=1e-5)
        token = choice.logprobs.tokens[position]  # ... and the position's own token
        assert top[token] == choice.logprobs.token_logprobs[position]
        assert set(top) - {token} == {w for w, _ in expected} - {token}
        logprob, state = scorer.step(state, word) if word else scorer.end(state)
        stepped.append(logprob)
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(stepped, abs=1e-5)


def test_prompt_conventions_first_token_and_end_of_sentence(http, scorer):
    """Without a leading boundary the first word is read after <s> but not scored; a
    leading </s> (lm-eval's EOT prefix) is a sentence start like <s>; </s> inside a prompt
    ends the sentence and the next starts from a fresh <s>."""
    a, b = SENTENCES[0], SENTENCES[1]
    ids = {w: i + 4 for i, w in enumerate(WORDS)}
    encoded = [ids.get(w, 1) for w in a.split()]

    def logprobs(prompt):
        body = {"model": MODEL_NAME, "prompt": prompt, "echo": True, "logprobs": 1,
                "max_tokens": 0}
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return [c["logprobs"]["token_logprobs"] for c in response.json()["choices"]]

    plain, eos_first, bos_first = logprobs([encoded, [3, *encoded], [2, *encoded]])
    assert plain[0] is None and plain[1:] == pytest.approx(full_logprobs(scorer, a)[1:-1])
    assert eos_first == bos_first
    assert bos_first[1:] == pytest.approx(full_logprobs(scorer, a)[:-1])
    (two,) = logprobs(f"<s> {a} </s> {b} </s>")
    assert two[1:] == pytest.approx(full_logprobs(scorer, a) + full_logprobs(scorer, b))
    (text,) = logprobs(a)
    assert text == plain  # a text prompt and its token ids are read alike


def test_greedy_generation_is_scorers(openai_client, scorer):
    for prefix in ["w1 w2", "", "w5"]:
        expected = scorer.generate(prefix, words=6, temperature=0)
        choice = openai_client.completions.create(
            model=MODEL_NAME, prompt=prefix or "<s>", max_tokens=6, temperature=0,
            logprobs=1).choices[0]
        words = [w for w in expected if w != "</s>"]
        assert choice.text == " " + " ".join(words)
        assert choice.logprobs.tokens == expected
        assert choice.finish_reason == ("stop" if expected[-1] == "</s>" else "length")
        for top, token, value in zip(choice.logprobs.top_logprobs, choice.logprobs.tokens,
                                     choice.logprobs.token_logprobs):
            assert max(top.values()) == value == top[token]  # greedy: its own token is best


def test_seeded_sampling_is_reproducible_and_is_scorers(openai_client, scorer):
    def sample(seed, n=1):
        return openai_client.completions.create(
            model=MODEL_NAME, prompt="w3 w4", max_tokens=30, temperature=1.0, seed=seed,
            n=n, logprobs=0)

    ended = None
    for seed in range(40):  # a seed whose sample ends with </s>, to see "stop"
        expected = scorer.generate("w3 w4", words=30, temperature=1.0, seed=seed)
        choice = sample(seed).choices[0]
        assert choice.logprobs.tokens == expected
        if expected[-1] == "</s>":
            ended = choice
            break
    assert ended is not None and ended.finish_reason == "stop"
    assert ended.logprobs.text_offset[-1] == len(ended.text)  # </s> adds no text
    first, again = sample(seed, n=3), sample(seed, n=3)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert first.choices[0].text == ended.text


def test_stop_strings_cut_the_text(openai_client, scorer):
    expected = scorer.generate("w1", words=8, temperature=0)
    words = [w for w in expected if w != "</s>"]
    if len(words) < 2:
        pytest.skip("the random model ends too early for a stop string")
    stop, unstopped = f" {words[1]}", " " + " ".join(words)
    choice = openai_client.completions.create(
        model=MODEL_NAME, prompt="w1", max_tokens=8, temperature=0,
        stop=["never there", stop]).choices[0]
    assert choice.text == unstopped[:unstopped.index(stop)] and choice.finish_reason == "stop"
    assert choice.stop_reason == stop  # vLLM's field: the string that matched
    free = openai_client.completions.create(model=MODEL_NAME, prompt="w1", max_tokens=8,
                                            temperature=0, stop=["never there"]).choices[0]
    assert free.stop_reason is None and free.text == unstopped.split(" </s>")[0]


@pytest.mark.parametrize("body, message, param", [
    ({"prompt": "w1", "best_of": 3}, "best_of=3", "best_of"),
    ({"prompt": "w1", "suffix": "x"}, "suffix", "suffix"),
    ({"prompt": "w1", "stream": True}, "stream", "stream"),
    ({"prompt": "w1", "top_p": 0.5}, "top_p", "top_p"),
    ({"prompt": [4, 2, 5]}, "<s> may only be the first token", "prompt"),
    ({"prompt": [4, 0]}, "padding", "prompt"),
    ({"prompt": [[4, 999]]}, "outside the vocabulary", "prompt"),
    ({"prompt": 3}, "prompt: must be a string, a non-empty list", "prompt"),
    ({"prompt": []}, "prompt: must be a string, a non-empty list", "prompt"),
    ({"prompt": [{"text": "w1"}]}, "prompt: must be a string, a non-empty list", "prompt"),
    ({"prompt": ["w1", 4]}, "prompt.texts.1: Input should be a valid string", "prompt.texts.1"),
    ({"prompt": [4, "w1"]}, "prompt.ids.1: Input should be a valid integer", "prompt.ids.1"),
    ({"prompt": [True, 4]}, "prompt.ids.0: Input should be a valid integer", "prompt.ids.0"),
    ({"prompt": [[4], ["5"]]}, "prompt.id_lists.1.0", "prompt.id_lists.1.0"),
    ({"prompt": "w1", "n": "2"}, "n: Input should be a valid integer", "n"),
    ({"prompt": "w1", "logprobs": 21}, "logprobs", "logprobs"),
    ({"prompt": "w1", "temperature": -1}, "temperature", "temperature"),
])
def test_refused_requests_say_why(http, body, message, param):
    """A malformed OpenAI request is 400 invalid_request_error naming the field, as OpenAI
    and vLLM answer it (lmonnx's own routes answer 422)."""
    response = http.post("/v1/completions", json={"model": MODEL_NAME, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and message in error["message"], error
    assert error["param"] == param and error["code"] is None
    assert "\n" not in error["message"]


def test_openai_routes_answer_400_where_lmonnx_routes_answer_422(http):
    """The same kind of mistake, each route in its own dialect: a body that is not JSON is
    400 everywhere; a value of the wrong type 400 on the OpenAI routes, 422 on lmonnx's."""
    for path in ("/v1/completions", "/tokenize", "/detokenize"):
        response = http.post(path, content=b"{")
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"]["type"] == "invalid_request_error"
    wrong_type = [("/v1/completions", {"prompt": "w1", "echo": "yes"}, "echo"),
                  ("/tokenize", {"prompt": 4}, "prompt"),
                  ("/detokenize", {"tokens": ["w1"]}, "tokens.0")]
    for path, body, param in wrong_type:
        response = http.post(path, json=body)
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"]["param"] == param
    for path, body in [("/v1/score", {"sentences": "w1"}), ("/v1/states", {"prefix": 4})]:
        response = http.post(path, json=body)
        assert response.status_code == 422 and set(response.json()["error"]) == {
            "type", "message"}


def test_unknown_model_and_harmless_extras(http):
    response = http.post("/v1/completions", json={"model": "gpt-4", "prompt": "w1"})
    assert response.status_code == 404 and "gpt-4" in response.json()["error"]["message"]
    response = http.post("/v1/completions", json={"prompt": "w1", "user": "me",
                                                  "max_tokens": 1, "top_p": 1.0})
    assert response.status_code == 200


def test_null_optional_fields_mean_their_defaults(http):
    """OpenAI's API takes null for every optional field; clients send it."""
    body = {"model": MODEL_NAME, "prompt": "w1 w2", "max_tokens": 2, "seed": 3, "logprobs": 1}
    nulls = {"n": None, "echo": None, "add_special_tokens": None, "temperature": None,
             "stop": None, "stream": None, "best_of": None, "suffix": None}
    plain = http.post("/v1/completions", json=body)
    nulled = http.post("/v1/completions", json={**body, **nulls})
    assert plain.status_code == nulled.status_code == 200
    assert nulled.json()["choices"] == plain.json()["choices"]
    assert http.post("/tokenize", json={"prompt": "w1", "add_special_tokens": None}
                     ).json()["tokens"] == [5]
    response = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": None})
    assert response.status_code == 400 and "prompt" in response.json()["error"]["message"]


def test_a_long_completion_lets_other_callers_through(server_url, http):
    """A 4,000-word prompt (a window of 4 tokens per turn) and 128 completions of up to 1,000
    tokens are many turns on the compute thread, not one: a score request sent meanwhile is
    answered long before they are done.  The prompt makes the request long whatever the
    sampled lengths (a factored model's </s> may come sooner)."""
    timings = {}
    prompt = " ".join(WORDS[i % len(WORDS)] for i in range(4000))

    def complete():
        start = time.perf_counter()
        with httpx.Client(base_url=server_url, timeout=120) as client:
            timings["status"] = client.post("/v1/completions", json={
                "prompt": prompt, "echo": True, "logprobs": 1, "n": 128, "max_tokens": 1000,
                "seed": 1}).status_code
        timings["completion"] = time.perf_counter() - start

    worker = threading.Thread(target=complete)
    worker.start()
    time.sleep(0.05)
    start = time.perf_counter()
    assert http.post("/v1/score", json={"sentences": ["w1 w2"]}).status_code == 200
    score = time.perf_counter() - start
    worker.join(120)
    assert timings["status"] == 200 and timings["completion"] > 0.2, timings
    assert score < 0.5 * timings["completion"], (score, timings)


# ---- vLLM's tokenizer routes and lm-eval's remote tokenizer ----------------------------------

def test_tokenize_detokenize_round_trip(http):
    answer = http.post("/tokenize", json={"prompt": "</s> w1 zebra w2", "model": MODEL_NAME,
                                          "add_special_tokens": False}).json()
    assert answer["tokens"] == [3, 5, 1, 6] and answer["count"] == 4
    assert answer["max_model_len"] > 0
    assert http.post("/tokenize", json={"prompt": "w1", "add_special_tokens": True}
                     ).json()["tokens"] == [2, 5]
    assert http.post("/detokenize", json={"tokens": [3, 5, 1, 6]}).json() == {
        "prompt": "</s> w1 <unk> w2"}
    assert http.post("/detokenize", json={"tokens": [99]}).status_code == 400
    for body, message in [({}, "prompt: Field required"),
                          ({"messages": [{"role": "user", "content": "w1"}]}, "chat")]:
        refused = http.post("/tokenize", json=body)
        assert refused.status_code == 400 and message in refused.json()["error"]["message"]


def test_a_long_text_tokenizes_on_a_worker_thread_alike(http):
    """Past 64k characters (or token ids) the work moves off the event loop: same answers,
    errors included."""
    words = " ".join(WORDS[i % len(WORDS)] for i in range(30_000))  # ~120k characters
    answer = http.post("/tokenize", json={"prompt": words, "return_token_strs": True}).json()
    assert answer["count"] == 30_000 and answer["token_strs"] == words.split()
    assert http.post("/detokenize", json={"tokens": answer["tokens"]}).json() == {
        "prompt": words}
    refused = http.post("/detokenize", json={"tokens": answer["tokens"] + [999]})
    assert refused.status_code == 400 and "position 30000" in refused.json()["error"]["message"]


def test_lm_eval_remote_tokenizer_reads_the_specials(server_url):
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    assert check_remote_tokenizer_support(f"{server_url}/v1/completions")
    tokenizer = RemoteTokenizer(f"{server_url}/v1/completions")
    assert (tokenizer.eos_token_id, tokenizer.bos_token_id) == (3, 2)
    assert tokenizer.encode("w1 w2") == [5, 6] and tokenizer.decode([5, 6]) == "w1 w2"


# ---- lm-evaluation-harness: a real task run ------------------------------------------------

MC_DOCS = [
    {"context": "w1 w2 w3", "choices": ["w4", "w5 w6", "zebra w7"], "label": 0},
    {"context": "w10 w11", "choices": ["w12 w13 w14", "w2"], "label": 1},
    {"context": "w20", "choices": ["w21", "w22", "w23", "w24"], "label": 3},
]
PPL_DOCS = ["w1 w2 w3 w4 w5", "w9 zebra w9 w8", "w30", "w0 w1 w0 w1 w0 w1 w0 w1 w0 w1 w2"]


def _write_tasks(folder):
    def jsonl(name, rows):
        path = folder / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path

    mc, ppl = jsonl("mc.jsonl", MC_DOCS), jsonl("ppl.jsonl", [{"text": t} for t in PPL_DOCS])
    (folder / "lmonnx_mc.yaml").write_text(f"""
task: lmonnx_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
""", encoding="utf-8")
    (folder / "lmonnx_ppl.yaml").write_text(f"""
task: lmonnx_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {ppl}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
""", encoding="utf-8")


@pytest.fixture(scope="module")
def lm_eval_results(server_url, tmp_path_factory):
    """Both tasks run once by lm_eval.simple_evaluate, offline: the data are local JSON
    lines, the tokenizer is the server's (no Hugging Face download)."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    folder = tmp_path_factory.mktemp("tasks")
    _write_tasks(folder)
    with pytest.MonkeyPatch.context() as env:
        for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            env.setenv(name, "1")
        env.setenv("HF_DATASETS_CACHE", str(folder / "hf_cache"))
        return lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"base_url": f"{server_url}/v1/completions", "model": MODEL_NAME,
                        "tokenizer_backend": "remote", "tokenized_requests": True},
            tasks=["lmonnx_mc", "lmonnx_ppl"],
            task_manager=TaskManager(include_path=str(folder), include_defaults=False),
            log_samples=True, bootstrap_iters=0)


def test_lm_eval_multiple_choice_loglikelihoods_are_lmonnx_sums(lm_eval_results, scorer):
    """A choice's loglikelihood: its words' log-probabilities after <s> and the context,
    i.e. full_scores(context + " " + choice) over the choice's words (no </s>)."""
    samples = sorted(lm_eval_results["samples"]["lmonnx_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(MC_DOCS)
    for doc, sample in zip(MC_DOCS, samples):
        got = [resp[0][0] for resp in sample["resps"]]
        context = len(doc["context"].split())
        expected = [sum(full_logprobs(scorer, f"{doc['context']} {c}")[context:-1])
                    for c in doc["choices"]]
        assert got == pytest.approx(expected, rel=1e-6)
        assert sample["acc"] == float(int(np.argmax(expected)) == doc["label"])


def test_lm_eval_word_perplexity_is_lmonnx_without_end_of_sentence(lm_eval_results, scorer):
    """lm-eval scores [<s>] + words: each doc's loglikelihood is lmonnx's sentence logprob
    minus its </s> term, and its words are the whitespace-separated words."""
    metrics = lm_eval_results["results"]["lmonnx_ppl"]
    scores = [full_logprobs(scorer, doc) for doc in PPL_DOCS]
    loglikelihood = sum(sum(s[:-1]) for s in scores)
    sentence_logprob = sum(s.logprob for s in scorer.score(PPL_DOCS))
    end_terms = sum(s[-1] for s in scores)
    assert loglikelihood == pytest.approx(sentence_logprob - end_terms, rel=1e-9)
    words = sum(len(re.split(r"\s+", doc)) for doc in PPL_DOCS)
    assert words == sum(len(doc.split()) for doc in PPL_DOCS)
    assert metrics["word_perplexity,none"] == pytest.approx(
        math.exp(-loglikelihood / words), rel=1e-6)
    nbytes = sum(len(doc.encode("utf-8")) for doc in PPL_DOCS)
    assert metrics["byte_perplexity,none"] == pytest.approx(
        math.exp(-loglikelihood / nbytes), rel=1e-6)


def test_lm_eval_text_requests_score_as_token_requests(server_url, scorer):
    """With tokenized_requests=False lm-eval sends the detokenized text; the server reads it
    without adding <s>, so the context lengths lm-eval counted still hold."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(base_url=f"{server_url}/v1/completions", model=MODEL_NAME,
                             tokenizer_backend="remote", tokenized_requests=False)
    doc = MC_DOCS[0]
    requests = [Instance("loglikelihood", doc, (doc["context"], f" {c}"), i)
                for i, c in enumerate(doc["choices"])]
    got = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    context = len(doc["context"].split())
    assert got == pytest.approx([sum(full_logprobs(scorer, f"{doc['context']} {c}")[context:-1])
                                 for c in doc["choices"]], rel=1e-6)
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (PPL_DOCS[1],),
                                                    0)], disable_tqdm=True)
    assert rolling == pytest.approx(sum(full_logprobs(scorer, PPL_DOCS[1])[:-1]), rel=1e-6)
