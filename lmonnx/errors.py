"""Exceptions of the runtime that are not bad input values (those are ``ValueError``s:
``ArtifactError``, ``CorpusError``).  Kept apart from ``runtime`` so that the CLI can catch
them without loading onnxruntime for commands that never run a model (``synth``, ``train``)."""


class ProviderError(RuntimeError):
    """``providers="cuda"`` was asked for and CUDA cannot be used here."""


class InferenceError(RuntimeError):
    """onnxruntime failed while running the model (out of memory on a huge batch, say)."""
