"""Vocabulary and tokenizer presets: the token-id contract (ARCHITECTURE.md)."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmonnx.vocab import (BOS_ID, EOS_ID, KERAS_FILTERS, PAD_ID, SPECIAL_TOKENS, UNK_ID,
                          TokenizerOptions, Vocabulary)

KERAS = TokenizerOptions.from_preset("keras")
WS = TokenizerOptions.from_preset("whitespace")


def test_special_ids():
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert SPECIAL_TOKENS == ("<pad>", "<unk>", "<s>", "</s>")


def test_presets():
    assert KERAS == TokenizerOptions("keras", True, KERAS_FILTERS)
    assert WS == TokenizerOptions("whitespace", False, "")
    with pytest.raises(ValueError, match="unknown tokenizer preset"):
        TokenizerOptions.from_preset("bpe")


def test_keras_split_lowercases_and_strips_punctuation():
    assert KERAS.split("Hello, World! It's 3.5%\tok\n") == ["hello", "world", "it's", "3", "5", "ok"]
    assert KERAS.split("a-b_c<unk>") == ["a", "b", "c", "unk"]
    assert KERAS.split("   ") == []


def test_whitespace_split_keeps_case_and_punctuation():
    assert WS.split(" The <unk> cost $ N , Inc. \t x ") == ["The", "<unk>", "cost", "$", "N", ",", "Inc.", "x"]


def test_options_dict_round_trip_and_errors():
    for opts in (KERAS, WS):
        assert TokenizerOptions.from_dict(json.loads(json.dumps(opts.to_dict()))) == opts
    with pytest.raises(KeyError):
        TokenizerOptions.from_dict({"preset": "keras", "lower": True})
    with pytest.raises(ValueError):
        TokenizerOptions.from_dict({"preset": "nope", "lower": True, "filters": ""})
    with pytest.raises(ValueError):
        TokenizerOptions.from_dict({"preset": "keras", "lower": "yes", "filters": ""})
    with pytest.raises(ValueError):
        TokenizerOptions.from_dict({"preset": "keras", "lower": True, "filters": "", "x": 1})


def test_fit_orders_by_count_then_first_occurrence():
    lines = ["b a c", "a d c", "e a"]  # a:3, c:2, then b, d, e (count 1) in first-seen order
    v = Vocabulary.fit(lines, 100, WS)
    assert v.tokens == SPECIAL_TOKENS + ("a", "c", "b", "d", "e")
    assert [v.token_to_id(w) for w in "a c b d e".split()] == [4, 5, 6, 7, 8]


def test_fit_cap_includes_specials():
    v = Vocabulary.fit(["b a c", "a d c", "e a"], 6, WS)
    assert len(v) == 6
    assert v.tokens[4:] == ("a", "c")
    assert "b" not in v and "a" in v


def test_fit_rejects_small_vocab_size():
    with pytest.raises(ValueError, match=r"vocab_size must be an integer >= 5 \(4 special "
                                         r"tokens and one word\); got 4"):
        Vocabulary.fit(["a"], 4, WS)
    with pytest.raises(TypeError, match="vocab_size must be an integer"):
        Vocabulary.fit(["a"], 5.0, WS)


def test_literal_specials_never_become_words():
    v = Vocabulary.fit(["<unk> <unk> <unk> x </s> <s> <pad>"], 100, WS)
    assert v.tokens == SPECIAL_TOKENS + ("x",)
    assert v.encode("<unk> x y").tolist() == [UNK_ID, 4, UNK_ID]
    # a literal <pad>/<s>/</s> in running text is an unknown word, never padding or a boundary
    assert v.encode("<pad> <s> </s>").tolist() == [UNK_ID] * 3


def test_keras_mode_encodes_case_and_punctuation_variants_alike():
    v = Vocabulary.fit(["The cat. the CAT!", "a dog"], 100, KERAS)
    assert v.tokens[4:6] == ("the", "cat")
    assert v.encode("THE, cat?!").tolist() == [4, 5]


def test_oov_never_dropped():
    v = Vocabulary.fit(["a b c"], 100, WS)
    ids = v.encode("a zz b yy yy c")
    assert ids.dtype == np.int32
    assert ids.tolist() == [4, UNK_ID, 5, UNK_ID, UNK_ID, 6]
    assert v.token_to_id("zz") == UNK_ID
    assert v.encode("").tolist() == []


def test_decode_and_id_to_token():
    v = Vocabulary.fit(["a b c"], 100, WS)
    assert v.decode(np.array([2, 4, 1, 6, 3])) == ["<s>", "a", "<unk>", "c", "</s>"]
    assert v.id_to_token(5) == "b"
    with pytest.raises(IndexError):
        v.id_to_token(7)
    with pytest.raises(IndexError):
        v.decode([-1])


def test_constructor_validation():
    with pytest.raises(ValueError, match="special tokens"):
        Vocabulary(("<unk>", "<pad>", "<s>", "</s>", "a"), WS)
    with pytest.raises(ValueError, match="duplicate"):
        Vocabulary(SPECIAL_TOKENS + ("a", "b", "a"), WS)


def test_json_round_trip(tmp_path):
    v = Vocabulary.fit(["Ünïcode wörds, and \"quotes\"", "and more"], 100, KERAS)
    w = Vocabulary.from_json(v.to_json())
    assert w == v and w.options == KERAS and w.tokens == v.tokens
    v.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json") == v
    assert list(tmp_path.iterdir()) == [tmp_path / "vocab.json"]  # no temp file left behind
    assert Vocabulary.fit(["x"], 100, WS) != Vocabulary.fit(["x"], 100, KERAS)


def test_load_names_the_file(tmp_path):
    """A damaged vocab.json (here a duplicate token) used to fail without naming the file."""
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps({"format": 1, "options": WS.to_dict(),
                                "tokens": [*SPECIAL_TOKENS, "a", "a"]}), encoding="utf-8")
    with pytest.raises(ValueError) as info:
        Vocabulary.load(path)
    assert str(info.value) == f"{path}: duplicate token 'a' in vocabulary"


@pytest.mark.parametrize("bad", ["not json", "[1, 2]", '{"tokens": ["a"]}',
                                 '{"tokens": ["<pad>", "<unk>", "<s>", "</s>"], "options": {"preset": "keras"}}'])
def test_from_json_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        Vocabulary.from_json(bad)


WORD = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc")),
               min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(WORD, min_size=1, max_size=8), min_size=1, max_size=10))
def test_whitespace_encode_decode_round_trip(sentences):
    lines = [" ".join(s) for s in sentences]
    v = Vocabulary.fit(lines, 10_000, WS)
    for line, words in zip(lines, sentences):
        words = line.split()  # str.split may split on separators the strategy did not exclude
        ids = v.encode(line)
        assert len(ids) == len(words)
        expected = ["<unk>" if w in ("<pad>", "<s>", "</s>") else w for w in words]
        assert v.decode(ids) == expected


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["alpha", "Beta", "gamma!", "(delta)", "e.f"]), min_size=1, max_size=20),
       st.integers(5, 12))
def test_keras_encode_only_in_vocab_or_unk(words, cap):
    line = " ".join(words)
    v = Vocabulary.fit([line], cap, KERAS)
    ids = v.encode(line)
    split = KERAS.split(line)
    assert len(ids) == len(split)
    for w, i in zip(split, ids.tolist()):
        assert i == (v.token_to_id(w) if w in v else UNK_ID)
        assert i == UNK_ID or v.id_to_token(i) == w


def test_ptb_whitespace_unk(ptb_dir):
    lines = (ptb_dir / "ptb.valid.txt").read_text(encoding="utf-8").splitlines()
    v = Vocabulary.fit(lines, 3000, WS)
    assert len(v) == 3000
    assert v.tokens.count("<unk>") == 1 and v.token_to_id("<unk>") == UNK_ID
    ids = v.encode(lines[1])
    words = lines[1].split()
    assert len(ids) == len(words)
    assert all(i == UNK_ID for w, i in zip(words, ids.tolist()) if w == "<unk>")
    assert v.tokens[4] == "the"  # PTB's most frequent word
