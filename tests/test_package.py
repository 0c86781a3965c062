"""Package-level promises: a clear message without a runtime, no TensorFlow on the scoring path."""

import subprocess
import sys
import textwrap


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)


def test_import_without_any_onnxruntime_names_the_extras():
    result = run_python("""
        import importlib.util
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "onnxruntime" else real(name, *a)
        import lmonnx
    """)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "ImportError" in last and "lmonnx[cpu]" in last and "lmonnx[gpu]" in last


def test_scoring_never_imports_tensorflow():
    result = run_python("""
        import sys, tempfile, pathlib
        import lmonnx
        from lmonnx.cli import main
        from lmonnx._testing import build_random_lm, make_vocab
        tmp = pathlib.Path(tempfile.mkdtemp())
        build_random_lm(tmp / "m.onnx", make_vocab(["a", "b"]), units=4, layers=1)
        (tmp / "c.txt").write_text("a b\\nb a\\n")
        scorer = lmonnx.Scorer(tmp / "m.onnx", providers="cpu")
        scorer.score(["a b"]); scorer.full_scores("a"); scorer.predict_next("a")
        scorer.evaluate(["a b"])
        for cmd in (["evaluate", str(tmp / "c.txt")], ["score", "a b"], ["predict", "a"]):
            assert main([*cmd, "--model", str(tmp / "m.onnx"), "--providers", "cpu"]) == 0
        print("tensorflow" in sys.modules, "keras" in sys.modules)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["False", "False"]
