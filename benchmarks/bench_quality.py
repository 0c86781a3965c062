"""quality_splits.py's splits and quality_table.py's closed-vocabulary convention on tiny text
(the KenLM and lmonnx rows need lmplz, the kenlm module and trained models: see the table's
docstring)."""

import quality_splits
import quality_table


def test_closed_vocabulary_maps_unseen_words_and_unk_alike():
    vocabulary = {"the", "cat", "<unk>"}
    assert quality_table.closed(["the dog <unk> cat"], vocabulary, "UNK") == ["the UNK UNK cat"]


def test_splits_follow_the_documented_cuts(tmp_path):
    (tmp_path / "ptb.valid.txt").write_text("".join(f"v{i}\n" for i in range(3100)))
    (tmp_path / "ptb.test.txt").write_text("t1\n\nt2\n")
    (tmp_path / "kjv.train.txt").write_text("".join(f"k{i}\n" for i in range(1000)))
    (tmp_path / "kjv.valid.txt").write_text("kv\n")
    got = quality_splits.splits(tmp_path)
    assert len(got["ptb"]["train"]) == 3033 and got["ptb"]["valid"][0] == "v3033"
    assert got["ptb"]["test"] == ["t1", "t2"]
    # KJV: lmonnx train --holdout 0.03's own split (seed 0), every model on the same verses
    kjv = got["kjv"]
    assert len(kjv["train"]) == 970 and len(kjv["valid"]) == 30
    assert sorted(kjv["train"] + kjv["valid"]) == sorted(f"k{i}" for i in range(1000))
    assert kjv["valid"] != [f"k{i}" for i in range(970, 1000)]
    assert got["kjv"]["test"] == ["kv"]


def test_torch_peer_scores_each_sentence_from_a_zero_state():
    """torch_lm's scoring convention: <eos> w1..wn -> w1..wn <eos>, n+1 tokens a sentence,
    and a sentence's NLL does not depend on the padding of its batch."""
    import pytest

    pytest.importorskip("torch")
    import torch_lm

    train = ["the cat sat", "the dog ran far"]
    vocab = torch_lm.vocabulary(train)
    model = torch_lm.WordLM(len(vocab), width=8)
    total, tokens = torch_lm.sentence_nll(model, ["the cat", "a dog ran"], vocab)
    alone = sum(torch_lm.sentence_nll(model, [s], vocab)[0] for s in ["the cat", "a dog ran"])
    assert tokens == 3 + 4 and abs(total - alone) < 1e-4 * abs(alone)


def _flat_arpa(path, words):
    """A KenLM model giving every word (and </s>) the same probability (KenLM needs a
    bigram section)."""
    import math

    entries = ["<s>", "</s>", "<unk>", *words]
    logprob = math.log10(1 / (len(entries) - 1))
    path.write_text(f"\\data\\\nngram 1={len(entries)}\nngram 2=1\n\n\\1-grams:\n"
                    + "".join(f"{-99 if w == '<s>' else logprob:.6f}\t{w}\t0\n" for w in entries)
                    + f"\n\\2-grams:\n{logprob:.6f}\t<s> {words[0]}\n\n\\end\\\n")
    return path


def test_mixed_row_at_weight_one_is_the_models_own_row(tmp_path):
    """Renaming KenLM's unknown words (for the KenLM side) leaves lmonnx's tokens alone: at
    L = 1 the mixed perplexity is the lmonnx row's, and at L = 0.5 it differs."""
    import pytest

    pytest.importorskip("kenlm")
    from lmonnx import Scorer
    from lmonnx._testing import build_random_lm, make_vocab

    train = ["the cat sat", "the dog ran far", "a cat ran"]
    split = {"train": train, "valid": ["the cat ran"],
             "test": ["the cat sat far", "a dog <unk> zebra ran", "the"]}
    model = tmp_path / "m.onnx"
    build_random_lm(model, make_vocab(["the", "cat", "dog", "ran"]), units=8, seed=2)
    arpa = _flat_arpa(tmp_path / "flat.arpa",
                      sorted({w for s in train for w in s.split()} | {quality_table.KENLM_UNK}))
    test = tmp_path / "test.txt"
    test.write_text("\n".join(split["test"]) + "\n")
    own = Scorer(model, providers="cpu").evaluate(test)
    (alone,) = quality_table.mixed_rows([model], arpa, 2, split, "1")
    assert alone["tokens"] == own.tokens
    assert abs(alone["perplexity"] - own.perplexity) < 1e-9 * own.perplexity
    (half,) = quality_table.mixed_rows([model], arpa, 2, split, "0.5")
    assert "L=0.5" in half["method"] and half["perplexity"] != alone["perplexity"]
    (fitted,) = quality_table.mixed_rows([model], arpa, 2, split, "auto")
    assert "by EM on valid" in fitted["method"]
