"""Smoke tests of ``ctc_table.py`` (both decoders, every LM row but KenLM's, a random-weight
model) and of ``nbest_lists.py`` feeding ``lmonnx rescore --tune``, on two KJV sentences.  No
WER or time is asserted: a random model's WER means nothing; the tables are for a trained one."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pyctcdecode")
pytest.importorskip("flashlight.lib.text.decoder")
pytest.importorskip("jiwer")

import ctc_table  # noqa: E402
import nbest_lists  # noqa: E402

LMONNX = [sys.executable, "-m", "lmonnx"]


@pytest.fixture(scope="module")
def kjv() -> Path:
    data = ctc_table.DEFAULT_DATA
    if not (data / "kjv.valid.txt").is_file() or not (data / ctc_table.TRAINING_TEXT).is_file():
        pytest.skip(f"the KJV text is not in {data}")
    return data


def test_ctc_table_prints_every_row(kjv, capsys):
    ctc_table.main(["--random-model", "--sentences", "2", "--no-kenlm", "--beam-width", "4",
                    "--batch-frames", "8", "--data", str(kjv)])
    out = capsys.readouterr().out
    assert "CPU:" in out
    rows = re.findall(r"^(pyctcdecode|flashlight)\s+(.+?)\s+(\d+\.\d\d)%\s+(\d+\.\d+)", out, re.M)
    assert [(d, lm.split(" random")[0]) for d, lm, _, _ in rows] == [
        ("pyctcdecode", "no LM"), ("pyctcdecode", "lmonnx"), ("flashlight", "no LM"),
        ("flashlight", "lmonnx"), ("flashlight", "lmonnx")]
    assert "(lazy)" in out and "(batch 8 frames)" in out and "calls/utt" in out


def test_ctc_table_refuses_an_unknown_decoder(kjv):
    with pytest.raises(SystemExit, match="--decoders"):
        ctc_table.main(["--random-model", "--decoders", "torchaudio", "--data", str(kjv)])


def test_nbest_lists_feed_rescore_tune(kjv, tmp_path, capsys):
    out = tmp_path / "nbest"
    nbest_lists.main(["--out", str(out), "--sentences", "2", "--beam-width", "4",
                      "--data", str(kjv)])
    lines = [json.loads(line) for line in (out / "nbest.jsonl").read_text().splitlines()]
    assert {line["utterance"] for line in lines} == {"0", "1"}
    assert all(isinstance(line["am_score"], float) and line["text"] for line in lines)
    references = (out / "references.txt").read_text().splitlines()
    assert references == ctc_table.read_sentences(kjv / "kjv.valid.txt", 2)
    model = ctc_table.random_model(kjv, tmp_path / "random.onnx")
    result = subprocess.run([*LMONNX, "rescore", str(out / "nbest.jsonl"), "--model", str(model),
                             "--references", str(out / "references.txt"), "--tune",
                             "--alpha-grid", "0,0.5", "--beta-grid", "0", "--threads", "1"],
                            capture_output=True, text=True, check=True)
    # the table goes to stderr when the best hypotheses go to stdout
    assert "first-pass WER" in result.stderr and "rescored WER" in result.stderr
    assert len(result.stdout.splitlines()) == 2  # one best hypothesis per utterance
