"""lmonnx: stacked-LSTM word language models from TensorFlow training to one ONNX file,
with exact and fast onnxruntime evaluation and scoring.

Scoring needs onnxruntime (``pip install 'lmonnx[cpu]'`` or ``'lmonnx[gpu]'``) and never
imports TensorFlow; training and export need the ``train`` extra.
"""

from importlib.util import find_spec as _find_spec

if _find_spec("onnxruntime") is None:  # both onnxruntime and onnxruntime-gpu provide it
    raise ImportError(
        "lmonnx needs an ONNX Runtime: install exactly one of the extras "
        "'lmonnx[cpu]' (onnxruntime) or 'lmonnx[gpu]' (onnxruntime-gpu, also runs on CPU)"
    )

from lmonnx.xent import masked_cross_entropy, token_nll_and_hits  # noqa: E402

__version__ = "0.1.0"

__all__ = ["Scorer", "masked_cross_entropy", "token_nll_and_hits", "__version__"]


def __getattr__(name):
    # Scorer pulls in onnxruntime; import it on first use so `import lmonnx` stays light.
    if name == "Scorer":
        from lmonnx.scorer import Scorer

        return Scorer
    raise AttributeError(f"module 'lmonnx' has no attribute {name!r}")
