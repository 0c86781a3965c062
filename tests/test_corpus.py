"""Corpus reading: line numbers, blank lines, UTF-8 errors, missing and empty files."""

import pytest

import subprocess
import sys

from lmonnx.corpus import (CorpusError, Line, read_sentences, require_sentences,
                           sentences_of_lines, to_line)


def _texts(lines):
    return [(line.key, line.text) for line in lines]


def _write(tmp_path, data: bytes, name="c.txt"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_blank_lines_skipped_and_numbered(tmp_path):
    p = _write(tmp_path, b"  first line \n\n \t \r\nsecond\r\nthird  ")
    assert list(read_sentences(p)) == [Line(1, "first line", 14), Line(4, "second", 7),
                                       Line(5, "third", 8)]  # bytes: spaces kept, CR not, +1


def test_utf8_text_and_bom(tmp_path):
    p = _write(tmp_path, "\ufeffcaf\u00e9 \u00fcber\n\u65e5\u672c\n".encode("utf-8"))
    # the BOM is not text: not in the sentence, not in its bytes
    assert list(read_sentences(p)) == [Line(1, "caf\u00e9 \u00fcber", 12), Line(2, "\u65e5\u672c", 7)]


def test_bad_utf8_names_the_line(tmp_path):
    p = _write(tmp_path, b"ok\n\nfine too\nbad \xff byte\nlater\n")
    it = read_sentences(p)
    assert next(it)[:2] == (1, "ok")
    assert next(it)[:2] == (3, "fine too")
    with pytest.raises(CorpusError, match=r"c\.txt:4: not valid UTF-8 \(byte 0xff.*--errors replace") as ei:
        next(it)
    assert "\n" not in str(ei.value)


def test_replace_mode(tmp_path):
    p = _write(tmp_path, b"ok\nbad \xff byte\n")
    assert _texts(read_sentences(p, errors="replace")) == [(1, "ok"), (2, "bad \ufffd byte")]


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
    with pytest.raises(CorpusError, match=r"no sentences \(the input is empty or blank\)"):
        list(require_sentences(p))


def test_require_sentences_passes_through(tmp_path):
    p = _write(tmp_path, b"\na b\nc\n")
    assert _texts(require_sentences(p)) == [(2, "a b"), (3, "c")]


def test_corpus_error_is_value_error():
    assert issubclass(CorpusError, ValueError)


def test_streams_large_file_lazily(tmp_path):
    p = _write(tmp_path, b"w " * 5 + b"\n" + b"x y z\n" * 200_000)
    it = read_sentences(p)
    assert next(it)[:2] == (1, "w w w w w")
    assert sum(1 for _ in it) == 200_000


def test_every_entry_point_reads_a_line_the_same_way(tmp_path):
    """A file, str lines, bytes lines and one sentence (to_line) give the same Line."""
    raw = b"\xef\xbb\xbf w6  w10 \r\n\n\xef\xbb\xbfw7\n"
    p = _write(tmp_path, raw)
    from_file = list(read_sentences(p))
    assert from_file == [Line(1, "w6  w10", 10), Line(3, "w7", 3)]
    assert list(sentences_of_lines(raw.splitlines(keepends=True))) == from_file
    assert list(sentences_of_lines(raw.decode("utf-8").splitlines(keepends=True))) == from_file
    assert to_line(1, "\ufeff w6  w10 \r\n") == from_file[0]
    assert to_line(3, b"\xef\xbb\xbfw7") == from_file[1]


def test_surrogateescaped_text_gets_its_bytes_back():
    """stdin decoded with surrogateescape (C locale): --errors decides, as for a file."""
    line = b"bad \xff byte".decode("utf-8", "surrogateescape")
    with pytest.raises(CorpusError, match=r"<lines>:1: not valid UTF-8 \(byte 0xff"):
        list(sentences_of_lines([line]))
    assert _texts(sentences_of_lines([line], errors="replace")) == [(1, "bad \ufffd byte")]


def test_lines_must_be_text(tmp_path):
    with pytest.raises(TypeError, match="got int"):
        list(sentences_of_lines([1]))
    with pytest.raises(TypeError, match="iterable of lines, got one str"):
        list(sentences_of_lines("one line"))


def test_dash_reads_stdin(tmp_path):
    code = ("from lmonnx.corpus import read_sentences; "
            "print([tuple(l) for l in read_sentences('-')])")
    out = subprocess.run([sys.executable, "-c", code], input=b"\xef\xbb\xbfa b\n\nc\n",
                         capture_output=True, check=True).stdout.decode()
    assert out.strip() == "[(1, 'a b', 4), (3, 'c', 2)]"
