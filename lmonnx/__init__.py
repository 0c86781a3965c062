"""lmonnx: stacked-LSTM word language models from TensorFlow training to one ONNX file,
with exact and fast onnxruntime evaluation and scoring.

Scoring needs onnxruntime (``pip install 'lmonnx[cpu]'`` or ``'lmonnx[gpu]'``) and never
imports TensorFlow; training and export need the ``train`` extra.
"""

__version__ = "0.1.0"

__all__ = ["Scorer", "masked_cross_entropy", "token_nll_and_hits", "__version__"]


def __getattr__(name):
    # Everything is imported on first use, so that `import lmonnx` (and the CLI, which imports
    # it for its version) stays light: Scorer pulls in onnxruntime (training works without a
    # runtime), and the kernel loads libgomp, which reads OMP_WAIT_POLICY once, when it loads:
    # the CLI sets that variable for its scoring commands and must do so before.
    if name == "Scorer":
        from lmonnx.scorer import Scorer

        return Scorer
    if name in ("masked_cross_entropy", "token_nll_and_hits"):
        from lmonnx import xent

        return getattr(xent, name)
    raise AttributeError(f"module 'lmonnx' has no attribute {name!r}")
