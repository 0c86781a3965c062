"""lmonnx: stacked-LSTM word language models from TensorFlow training to one ONNX file,
with exact and fast onnxruntime evaluation and scoring.

Scoring needs onnxruntime (``pip install 'lmonnx[cpu]'`` or ``'lmonnx[gpu]'``) and never
imports TensorFlow; training and export need the ``train`` extra.
"""

from lmonnx.xent import masked_cross_entropy, token_nll_and_hits  # noqa: E402

__version__ = "0.1.0"

__all__ = ["Scorer", "masked_cross_entropy", "token_nll_and_hits", "__version__"]


def __getattr__(name):
    # Scorer pulls in onnxruntime; import it on first use so `import lmonnx` stays light and
    # training works without a runtime (lmonnx.runtime says which extra is missing).
    if name == "Scorer":
        from lmonnx.scorer import Scorer

        return Scorer
    raise AttributeError(f"module 'lmonnx' has no attribute {name!r}")
