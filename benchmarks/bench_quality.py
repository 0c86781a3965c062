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
