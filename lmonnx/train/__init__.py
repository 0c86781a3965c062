"""Training: the course's LanguageModel in Keras 3 (the only package, with export, that imports
TensorFlow) and the training loop.

Importing this package imports no TensorFlow (``lmonnx train --help`` reads
:class:`~lmonnx.train.config.TrainConfig` from here).  ``LanguageModel`` is loaded on first
use; importing :mod:`lmonnx.train.model` (or ``from lmonnx.train import LanguageModel``)
starts TensorFlow quietly and registers the class with Keras, which
``keras.saving.load_model(run_dir / "model.keras")`` needs.
"""

from lmonnx.train.config import TrainConfig

__all__ = ["LanguageModel", "TrainConfig", "default_embedding_dim"]


def __getattr__(name: str):
    if name in ("LanguageModel", "default_embedding_dim"):
        from lmonnx.train import model

        return getattr(model, name)
    raise AttributeError(f"module 'lmonnx.train' has no attribute {name!r}")
