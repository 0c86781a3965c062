"""Training: the recipes' models in Keras 3 (the only package, with export, that imports
TensorFlow) and the training loop.

Importing this package imports no TensorFlow (``lmonnx train --help`` reads
:class:`~lmonnx.train.config.TrainConfig` from here).  ``TiedLanguageModel`` (the default
recipe's, :mod:`lmonnx.train.tied`) and ``LanguageModel`` (the course's,
:mod:`lmonnx.train.model`) are loaded on first use; importing their module (or ``from
lmonnx.train import TiedLanguageModel``) starts TensorFlow quietly and registers the class
with Keras, which ``keras.saving.load_model(run_dir / "model.keras")`` needs.
"""

from lmonnx.train.config import TrainConfig

__all__ = ["LanguageModel", "TiedLanguageModel", "TrainConfig", "default_embedding_dim"]


def __getattr__(name: str):
    if name in ("LanguageModel", "default_embedding_dim"):
        from lmonnx.train import model

        return getattr(model, name)
    if name == "TiedLanguageModel":
        from lmonnx.train import tied

        return tied.TiedLanguageModel
    raise AttributeError(f"module 'lmonnx.train' has no attribute {name!r}")
