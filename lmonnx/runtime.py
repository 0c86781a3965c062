"""Open an lmonnx ``.onnx`` with onnxruntime: metadata, execution provider, logits.

No TensorFlow here.  Every onnxruntime session lmonnx makes -- for scoring, evaluation and
export's self-check -- is built by :class:`ModelSession` from a path or from the model's bytes,
with the same options and the same signature and metadata checks.  Provider choice is never
silent:

  ``"auto"``  CUDA when onnxruntime-gpu can really use a GPU, else CPU; the reason for a CPU
             fallback is kept in ``ModelSession.provider_note`` (shown in the evaluation
             report's provider line) and logged at debug level (logger ``lmonnx``);
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

try:
    import onnxruntime as ort
except ImportError:  # both onnxruntime and onnxruntime-gpu provide the module
    raise ImportError(
        "scoring needs an ONNX Runtime: install exactly one of the extras 'lmonnx[cpu]' "
        "(onnxruntime) or 'lmonnx[gpu]' (onnxruntime-gpu, also runs on CPU)") from None

from lmonnx.artifact import INPUT_NAME, OUTPUT_NAME, ArtifactError, ArtifactMetadata, parse_metadata
from lmonnx.errors import InferenceError, ProviderError

log = logging.getLogger("lmonnx")

PROVIDER_CHOICES = ("auto", "cpu", "cuda")


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


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


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

    def __init__(self, model, providers: str = "auto", num_threads: int | None = None, *,
                 name: str | None = None):
        """``model``: a path to an ``.onnx`` file, or the serialized model as ``bytes`` (export
        checks the model it is about to write this way); ``name`` labels it in messages."""
        if providers not in PROVIDER_CHOICES:
            raise ValueError(f"providers must be one of {', '.join(PROVIDER_CHOICES)}; got {providers!r}")
        if isinstance(model, (bytes, bytearray)):
            source, self.path = bytes(model), None
            self.name = name or "<model bytes>"
        elif isinstance(model, (str, os.PathLike)):
            self.path = Path(os.fspath(model))
            self.name = name or str(self.path)
            if self.path.is_dir():
                raise IsADirectoryError(f"model path is a directory, not an .onnx file: {self.path}")
            if not self.path.exists():
                raise FileNotFoundError(f"model not found: {self.path} (create one with `lmonnx export`)")
            source = str(self.path)
        else:
            raise TypeError(f"model must be a path or bytes, got {type(model).__name__}")
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
            self._session = ort.InferenceSession(source, sess_options=options, providers=wanted)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise ArtifactError(f"{self.name} is not a readable ONNX model: {_first_line(exc)}") from None
        self.provider = self._session.get_providers()[0]
        if providers == "cuda" and self.provider != CUDA:
            raise ProviderError("--providers cuda: onnxruntime could not start the CUDA provider")
        if CUDA in wanted and self.provider != CUDA:
            self.provider_note = "CUDA not used: onnxruntime could not start the CUDA provider"
        if self.provider_note:
            log.debug("%s: %s; running on CPU", self.name, self.provider_note)
        self._check_signature()
        props = self._session.get_modelmeta().custom_metadata_map
        self.metadata: ArtifactMetadata = parse_metadata(props, self.name)
        self.vocab = self.metadata.vocab
        self._check_vocab_width()

    def _check_signature(self) -> None:
        inputs = [i.name for i in self._session.get_inputs()]
        outputs = [o.name for o in self._session.get_outputs()]
        if inputs != [INPUT_NAME] or OUTPUT_NAME not in outputs:
            raise ArtifactError(
                f"{self.name} is not an lmonnx model: expected input {INPUT_NAME!r} and output "
                f"{OUTPUT_NAME!r}, found inputs {inputs} and outputs {outputs}")

    def _check_vocab_width(self) -> None:
        """The vocabulary must name every logit: a shorter or longer one would silently score
        the wrong words.  A symbolic width is checked on every batch instead."""
        (out,) = [o for o in self._session.get_outputs() if o.name == OUTPUT_NAME]
        width = out.shape[-1] if out.shape else None
        self._logits_width = width if isinstance(width, int) else None
        if self._logits_width is not None and self._logits_width != len(self.vocab):
            raise ArtifactError(self._width_mismatch(self._logits_width))

    def _width_mismatch(self, width: int) -> str:
        return (f"{self.name}: the graph's logits have {width} entries per position but its "
                f"lmonnx.vocab metadata holds {len(self.vocab)} tokens; the metadata does not "
                "belong to this graph (re-export the model)")

    @property
    def provider_description(self) -> str:
        """The provider in use, and why CUDA was not used when ``auto`` fell back."""
        return f"{self.provider} ({self.provider_note})" if self.provider_note else self.provider

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
                logits = binding.get_outputs()[0].numpy()
            else:
                logits = self._session.run([OUTPUT_NAME], {INPUT_NAME: ids})[0]
        except Exception as exc:  # onnxruntime's own types (Fail, RuntimeException, ...)
            raise InferenceError(
                f"onnxruntime failed on a batch of shape {ids.shape}: {_first_line(exc, 300)}") from exc
        if logits.shape[-1] != len(self.vocab):
            raise ArtifactError(self._width_mismatch(logits.shape[-1]))
        return logits

    def __repr__(self) -> str:
        return (f"ModelSession({self.name!r}, provider={self.provider!r}, "
                f"vocab_size={self.vocab_size})")
