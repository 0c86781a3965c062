"""Corpus reading: line numbers, blank lines, UTF-8 errors, missing and empty files."""

import pytest

from lmonnx.corpus import CorpusError, read_sentences, require_sentences


def _write(tmp_path, data: bytes, name="c.txt"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_blank_lines_skipped_and_numbered(tmp_path):
    p = _write(tmp_path, b"  first line \n\n \t \r\nsecond\r\nthird  ")
    assert list(read_sentences(p)) == [(1, "first line"), (4, "second"), (5, "third")]


def test_utf8_text_and_bom(tmp_path):
    p = _write(tmp_path, "\ufeffcaf\u00e9 \u00fcber\n\u65e5\u672c\n".encode("utf-8"))
    assert list(read_sentences(p)) == [(1, "caf\u00e9 \u00fcber"), (2, "\u65e5\u672c")]


def test_bad_utf8_names_the_line(tmp_path):
    p = _write(tmp_path, b"ok\n\nfine too\nbad \xff byte\nlater\n")
    it = read_sentences(p)
    assert next(it) == (1, "ok")
    assert next(it) == (3, "fine too")
    with pytest.raises(CorpusError, match=r"c\.txt:4: not valid UTF-8 \(byte 0xff.*--errors replace") as ei:
        next(it)
    assert "\n" not in str(ei.value)


def test_replace_mode(tmp_path):
    p = _write(tmp_path, b"ok\nbad \xff byte\n")
    assert list(read_sentences(p, errors="replace")) == [(1, "ok"), (2, "bad \ufffd byte")]


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CorpusError, match=r"nope\.txt: no such file"):
        read_sentences(tmp_path / "nope.txt")  # raised at the call, not at the first next()
    with pytest.raises(CorpusError, match="directory"):
        read_sentences(tmp_path)
    with pytest.raises(CorpusError, match="no such file"):
        require_sentences(tmp_path / "nope.txt")
    with pytest.raises(CorpusError, match="errors"):
        read_sentences(_write(tmp_path, b"x"), errors="ignore")


@pytest.mark.parametrize("data", [b"", b"\n \n\t\r\n"], ids=["empty", "blank"])
def test_require_sentences_empty(tmp_path, data):
    p = _write(tmp_path, data)
    assert list(read_sentences(p)) == []
    with pytest.raises(CorpusError, match=r"no sentences \(the file is empty or blank\)"):
        list(require_sentences(p))


def test_require_sentences_passes_through(tmp_path):
    p = _write(tmp_path, b"\na b\nc\n")
    assert list(require_sentences(p)) == [(2, "a b"), (3, "c")]


def test_corpus_error_is_value_error():
    assert issubclass(CorpusError, ValueError)


def test_streams_large_file_lazily(tmp_path):
    p = _write(tmp_path, b"w " * 5 + b"\n" + b"x y z\n" * 200_000)
    it = read_sentences(p)
    assert next(it) == (1, "w w w w w")
    assert sum(1 for _ in it) == 200_000
