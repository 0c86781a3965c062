"""Open an lmonnx ``.onnx`` with onnxruntime: metadata, execution provider, logits.

No TensorFlow here.  Provider choice is never silent:

  ``"auto"``  CUDA when onnxruntime-gpu can really use a GPU, else CPU; the reason for a CPU
             fallback is logged (logger ``lmonnx``) and kept in ``ModelSession.provider_note``;
  ``"cpu"``   CPU only;
  ``"cuda"``  CUDA or a ``RuntimeError`` that says why not.

On CUDA, inputs and outputs go through IO binding: the int32 ids are bound from host memory and
the logits are written once into a host buffer that the kernel then reads in place.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lmonnx.artifact import INPUT_NAME, OUTPUT_NAME, ArtifactError, ArtifactMetadata, parse_metadata

log = logging.getLogger("lmonnx")

PROVIDER_CHOICES = ("auto", "cpu", "cuda")


class ProviderError(RuntimeError):
    """``providers="cuda"`` was asked for and CUDA cannot be used here."""


class InferenceError(RuntimeError):
    """onnxruntime failed while running the model (out of memory on a huge batch, say)."""
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def cuda_unavailable_reason() -> str | None:
    """None when onnxruntime here can run on a CUDA GPU, else a one-line reason."""
    if CUDA not in ort.get_available_providers():
        return "this onnxruntime build has no CUDA provider (install lmonnx[gpu])"
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver found (libcuda.so.1 is not loadable)"
    return None


def _session_options(num_threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if num_threads is not None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, int):
            raise TypeError(f"num_threads must be an int or None, got {type(num_threads).__name__}")
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        options.intra_op_num_threads = num_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # our own messages say what matters; ORT's warnings are noise
    return options


class ModelSession:
    """An lmonnx model opened in onnxruntime.

    Attributes: ``path``, ``metadata`` (vocabulary, config, training record), ``vocab``,
    ``provider`` (the provider actually running the graph), ``provider_note`` (why, when
    ``auto`` fell back to CPU), ``num_threads``.
    """

    def __init__(self, path, providers: str = "auto", num_threads: int | None = None):
        if providers not in PROVIDER_CHOICES:
            raise ValueError(f"providers must be one of {', '.join(PROVIDER_CHOICES)}; got {providers!r}")
        self.path = Path(os.fspath(path))
        if self.path.is_dir():
            raise IsADirectoryError(f"model path is a directory, not an .onnx file: {self.path}")
        if not self.path.exists():
            raise FileNotFoundError(f"model not found: {self.path} (create one with `lmonnx export`)")
        self.num_threads = num_threads
        options = _session_options(num_threads)
        self.provider_note = ""
        wanted = [CPU]
        if providers in ("auto", "cuda"):
            reason = cuda_unavailable_reason()
            if reason is None:
                wanted = [CUDA, CPU]
            elif providers == "cuda":
                raise ProviderError(f"--providers cuda: CUDA is not usable: {reason}")
            else:
                self.provider_note = f"CUDA not used: {reason}"
        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=options,
                                                 providers=wanted)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ArtifactError(f"{self.path} is not a readable ONNX model: {first[:200]}") from None
        self.provider = self._session.get_providers()[0]
        if providers == "cuda" and self.provider != CUDA:
            raise ProviderError("--providers cuda: onnxruntime could not start the CUDA provider")
        if CUDA in wanted and self.provider != CUDA:
            self.provider_note = "CUDA not used: onnxruntime could not start the CUDA provider"
        if self.provider_note:
            log.warning("lmonnx: %s; running on CPU", self.provider_note)
        self._check_signature()
        props = self._session.get_modelmeta().custom_metadata_map
        self.metadata: ArtifactMetadata = parse_metadata(props, str(self.path))
        self.vocab = self.metadata.vocab

    def _check_signature(self) -> None:
        inputs = [i.name for i in self._session.get_inputs()]
        outputs = [o.name for o in self._session.get_outputs()]
        if inputs != [INPUT_NAME] or OUTPUT_NAME not in outputs:
            raise ArtifactError(
                f"{self.path} is not an lmonnx model: expected input {INPUT_NAME!r} and output "
                f"{OUTPUT_NAME!r}, found inputs {inputs} and outputs {outputs}")

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """float32 [batch, time, vocab_size] logits of int32 ids [batch, time] (0 = padding)."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int32)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, time], got shape {ids.shape}")
        try:
            if self.provider == CUDA:
                binding = self._session.io_binding()
                binding.bind_cpu_input(INPUT_NAME, ids)
                binding.bind_output(OUTPUT_NAME, "cpu")
                self._session.run_with_iobinding(binding)
                return binding.get_outputs()[0].numpy()
            return self._session.run([OUTPUT_NAME], {INPUT_NAME: ids})[0]
        except Exception as exc:  # onnxruntime's own types (Fail, RuntimeException, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InferenceError(
                f"onnxruntime failed on a batch of shape {ids.shape}: {first[:300]}") from exc

    def __repr__(self) -> str:
        return (f"ModelSession({str(self.path)!r}, provider={self.provider!r}, "
                f"vocab_size={self.vocab_size})")
