"""Package-level promises: the layering of the modules.

- scoring never imports TensorFlow (nothing under lmonnx/ outside train/ and export.py does);
- training, ``lmonnx synth`` and ``import lmonnx`` work without any onnxruntime, and using the
  scorer without one says which extra to install;
- training never loads the scoring stack (evaluate, runtime, scorer).
"""

import subprocess
import sys
import textwrap

HIDE_ONNXRUNTIME = """
    import sys
    sys.modules["onnxruntime"] = None  # `import onnxruntime` now raises ImportError
"""


def run_python(code: str, prelude: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(prelude) + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300)


def test_without_onnxruntime_the_scorer_names_the_extras():
    result = run_python("""
        import lmonnx  # the kernel and the package import fine
        lmonnx.masked_cross_entropy
        lmonnx.Scorer
    """, HIDE_ONNXRUNTIME)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "MissingDependencyError" in last and "lmonnx[cpu]" in last and "lmonnx[gpu]" in last


def test_training_and_synth_work_without_onnxruntime(tmp_path):
    result = run_python(f"""
        import lmonnx.train, lmonnx.train.trainer, lmonnx.rundir
        from lmonnx.cli import main
        assert main(["synth", "--out", {str(tmp_path / "synth")!r}, "--words", "20",
                     "--train-sentences", "50", "--valid-sentences", "10",
                     "--test-sentences", "10"]) == 0
        scoring = [m for m in ("lmonnx.evaluate", "lmonnx.runtime", "lmonnx.scorer")
                   if m in sys.modules]
        print("scoring modules loaded:", scoring)
    """, HIDE_ONNXRUNTIME)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "scoring modules loaded: []"
    assert (tmp_path / "synth" / "train.txt").is_file()


def test_synth_does_not_load_onnxruntime(tmp_path):
    result = run_python(f"""
        import sys
        from lmonnx.cli import main
        assert main(["synth", "--out", {str(tmp_path / "s")!r}, "--words", "10",
                     "--train-sentences", "20", "--valid-sentences", "5",
                     "--test-sentences", "5"]) == 0
        print("onnxruntime" in sys.modules, "tensorflow" in sys.modules)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["False", "False"]


def test_no_module_outside_training_and_export_imports_tensorflow():
    result = run_python("""
        import importlib, pkgutil, sys
        import lmonnx
        # iter_modules, not walk_packages: walking would import the train package itself
        names = sorted(m.name for m in pkgutil.iter_modules(lmonnx.__path__, "lmonnx."))
        skipped = [n for n in names if n.startswith("lmonnx.train")
                   or n in ("lmonnx.export", "lmonnx.__main__")]
        imported = [n for n in names if n not in skipped]
        for name in imported:
            importlib.import_module(name)
        print(len(imported), "tensorflow" in sys.modules, "keras" in sys.modules)
    """)
    assert result.returncode == 0, result.stderr
    count, tf, keras = result.stdout.split()
    assert int(count) >= 12 and (tf, keras) == ("False", "False")


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
