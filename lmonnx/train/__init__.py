"""Training: the course's LanguageModel in Keras 3 (the only package, with export, that imports
TensorFlow).

Importing this package registers ``LanguageModel`` with Keras, so that
``keras.saving.load_model(run_dir / "model.keras")`` works afterwards.
"""

from lmonnx.train.model import LanguageModel, default_embedding_dim

__all__ = ["LanguageModel", "default_embedding_dim"]
