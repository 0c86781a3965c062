"""Smoke test of ``scale_table.py``: ``--quick`` (two tiny vocabularies, 2x16 models) builds,
exports, checks, scores and trains full and adaptive models and prints both tables; and the
Zipfian text it scores.  No timing is asserted: the table's ratios are for a quiet machine."""

import re

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")

import scale_table as st  # noqa: E402


def test_zipf_ranks_follow_the_law_and_share_the_draws():
    draws = st.Draws.make(400, seed=0)
    assert len(draws.uniforms) == draws.lengths.sum() and draws.lengths.min() >= 1
    small = st.zipf_ranks(100, draws.uniforms, 1.0)
    large = st.zipf_ranks(10_000, draws.uniforms, 1.0)
    assert small.min() >= 0 and small.max() < 100 and large.max() < 10_000
    counts = np.bincount(small, minlength=100)
    assert counts[0] > counts[9] > counts[99] >= 0  # frequent ranks first
    # the same draws: a larger vocabulary moves a quantile to a rarer rank, never a commoner one
    assert np.all(large >= small)


def test_zipf_text_is_in_the_vocabulary():
    vocab, lines = st.zipf_text(50, st.Draws.make(20, seed=1), 1.0)
    assert len(vocab) == 50 and len(lines) == 20
    ids = [vocab.encode(line.text) for line in lines]
    assert all(1 not in sentence for sentence in ids)  # no <unk>


def test_quick_prints_both_tables(capsys):
    assert st.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("CPU: ") and "command: python benchmarks/scale_table.py --quick" in out
    rows = [line for line in out.splitlines() if re.match(r"\| [\d,]+ \|", line)]
    assert len(rows) == 4  # two vocabularies, scoring and training
    speedups = [float(x) for x in re.findall(r"\*\*([\d.]+)x\*\*", out)]
    assert len(speedups) == 4 and all(s > 0 for s in speedups)


def test_bad_vocab_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        st.main(["--vocab", "100,many"])
    assert exc.value.code == 2
    assert "--vocab" in capsys.readouterr().err
