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

from lmonnx.errors import ArgumentTypeError, InferenceError, InvalidArgumentError, MissingDependencyError, ProviderError

try:
    import onnxruntime as ort
except ImportError:  # both onnxruntime and onnxruntime-gpu provide the module
    raise MissingDependencyError(
        "scoring needs an ONNX Runtime: install exactly one of the extras 'lmonnx[cpu]' "
        "(onnxruntime) or 'lmonnx[gpu]' (onnxruntime-gpu, also runs on CPU)") from None

from lmonnx.artifact import (INPUT_NAME, OUTPUT_NAME, STATE_INPUTS, STATE_OUTPUTS, ArtifactError,
                             ArtifactMetadata, parse_metadata)
from lmonnx.graph import TARGETS, TOKEN_HIT, TOKEN_LOGPROB, add_loss_head

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
            raise ArgumentTypeError(f"num_threads must be an int or None, got {type(num_threads).__name__}")
        if num_threads < 1:
            raise InvalidArgumentError(f"num_threads must be >= 1, got {num_threads}")
        options.intra_op_num_threads = num_threads
    # onnxruntime's intra-op threads spin after each run by default; in evaluation the kernel
    # runs next on the same cores, and spinning threads steal them (PTB test, 2 cores:
    # 15-20% slower with spinning, every batch size and budget tried).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # our own messages say what matters; ORT's warnings are noise
    return options


class ModelSession:
    """An lmonnx model opened in onnxruntime.

    Attributes: ``path`` (None when opened from bytes), ``source`` (the path or the bytes),
    ``name``, ``metadata`` (vocabulary,
    config, training record), ``vocab``, ``stateful`` (format 2: the LSTM state is an input and
    an output), ``provider`` (the provider actually running the graph), ``provider_note``
    (why, when ``auto`` fell back to CPU), ``num_threads``.
    """

    def __init__(self, model, providers: str = "auto", num_threads: int | None = None, *,
                 name: str | None = None, loss_head: bool | None = None):
        """``model``: a path to an ``.onnx`` file, or the serialized model as ``bytes`` (export
        checks the model it is about to write this way); ``name`` labels it in messages.
        ``loss_head``: compute per-position log-probabilities and hits in the graph
        (``lmonnx.loss_head``); None = on CUDA only, where the logits must stay on the device."""
        if providers not in PROVIDER_CHOICES:
            raise InvalidArgumentError(f"providers must be one of {', '.join(PROVIDER_CHOICES)}; got {providers!r}")
        self.provider_choice = providers
        if isinstance(model, (bytes, bytearray)):
            source, self.path = bytes(model), None
            self.source = source
            self.name = name or "<model bytes>"
        elif isinstance(model, (str, os.PathLike)):
            self.path = Path(os.fspath(model))
            self.name = name or str(self.path)
            if self.path.is_dir():
                raise IsADirectoryError(f"model path is a directory, not an .onnx file: {self.path}")
            if not self.path.exists():
                raise FileNotFoundError(f"model not found: {self.path} (create one with `lmonnx export`)")
            source = str(self.path)
            self.source = self.path
        else:
            raise ArgumentTypeError(f"model must be a path or bytes, got {type(model).__name__}")
        _session_options(num_threads)  # a bad thread count is the caller's error, not the model's
        self.num_threads = num_threads
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
        # On CUDA the loss is computed in the graph so the logits stay on the device.
        self.loss_head = (CUDA in wanted) if loss_head is None else bool(loss_head)
        self._declared_width = None
        if self.loss_head:
            raw = source if isinstance(source, bytes) else Path(source).read_bytes()
            try:
                source, self._declared_width = add_loss_head(raw)
            except ImportError:  # onnx missing: say which extra, not "unreadable model"
                raise
            except Exception as exc:  # a file onnx cannot parse: the session would say so too
                raise ArtifactError(f"{self.name} is not a readable ONNX model: "
                                    f"{_first_line(exc)}") from None
        self._open(source, wanted)
        if providers == "cuda" and self.provider != CUDA:
            raise ProviderError("--providers cuda: onnxruntime could not start the CUDA provider")
        if CUDA in wanted and self.provider != CUDA:
            self.provider_note = "CUDA not used: onnxruntime could not start the CUDA provider"
        self._check_signature()
        props = self._session.get_modelmeta().custom_metadata_map
        self.metadata: ArtifactMetadata = parse_metadata(props, self.name)
        self.vocab = self.metadata.vocab
        self.quantization = self.metadata.quantization
        if self.quantization and self.provider == CUDA:
            note = ("this int8 model runs on CPU only (DynamicQuantizeLSTM and MatMulInteger "
                    "have no CUDA kernels); use the fp32 model on CUDA")
            if providers == "cuda":
                raise ProviderError(f"--providers cuda: {self.name}: {note}")
            self.provider_note = f"CUDA not used: {note}"
            if self.loss_head and loss_head is None:  # the head was only there for CUDA
                self.loss_head, self._declared_width = False, None
                source = raw
            self._open(source, [CPU])
        if self.provider_note:
            log.debug("%s: %s; running on CPU", self.name, self.provider_note)
        self._check_format()
        self._check_vocab_width()

    def _open(self, source, providers: list[str]) -> None:
        try:
            self._session = ort.InferenceSession(source, sess_options=_session_options(
                self.num_threads), providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise ArtifactError(f"{self.name} is not a readable ONNX model: {_first_line(exc)}") from None
        self.provider = self._session.get_providers()[0]

    def _check_signature(self) -> None:
        inputs = sorted(i.name for i in self._session.get_inputs())
        outputs = [o.name for o in self._session.get_outputs()]
        scores = [TOKEN_LOGPROB, TOKEN_HIT] if self.loss_head else [OUTPUT_NAME]
        extra = [TARGETS] if self.loss_head else []
        stateless = sorted([INPUT_NAME, *extra])
        stateful = sorted([INPUT_NAME, *extra, *STATE_INPUTS])
        if inputs not in (stateless, stateful) or not set(scores) <= set(outputs) or (
                inputs == stateful and not set(STATE_OUTPUTS) <= set(outputs)):
            raise ArtifactError(
                f"{self.name} is not an lmonnx model: expected input {INPUT_NAME!r} (and "
                f"{'/'.join(STATE_INPUTS)} in, {'/'.join(STATE_OUTPUTS)} out) and output "
                f"{OUTPUT_NAME!r}, found inputs {inputs} and outputs {outputs}")
        self.stateful = inputs == stateful

    def _check_format(self) -> None:
        version = self.metadata.format_version
        if (version == "2") != self.stateful:
            raise ArtifactError(
                f"{self.name} says lmonnx format {version} but its graph "
                f"{'has' if self.stateful else 'lacks'} the LSTM state inputs; the file was "
                "edited or is damaged (re-export it)")
        if self.stateful:
            shape = {i.name: i.shape for i in self._session.get_inputs()}[STATE_INPUTS[0]]
            config = self.metadata.config
            self.num_layers = int(config.get("num_lstm_layers", shape[0]))
            self.num_units = int(config.get("num_lstm_units", shape[-1]))
            for declared, expected in ((shape[0], self.num_layers), (shape[-1], self.num_units)):
                if isinstance(declared, int) and declared != expected:
                    raise ArtifactError(
                        f"{self.name}: state inputs are {shape} but the config says "
                        f"{self.num_layers} layers of {self.num_units} units")

    def require_state(self, feature: str) -> None:
        """``ArtifactError`` unless the model carries the LSTM state (format 2)."""
        if not self.stateful:
            raise ArtifactError(
                f"{self.name} is a format-1 (stateless) model; {feature} needs the LSTM state: "
                "re-export this model with lmonnx export")

    def zero_state(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """(h, c) float32 [layers, batch, units] of zeros: the start of a sentence."""
        self.require_state("a state")
        shape = (self.num_layers, batch, self.num_units)
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    def _check_vocab_width(self) -> None:
        """The vocabulary must name every logit: a shorter or longer one would silently score
        the wrong words.  A symbolic width is checked on every batch instead."""
        if self.loss_head:
            width = self._declared_width
        else:
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
        """float32 [batch, time, vocab_size] logits of int32 ids [batch, time] (0 = padding),
        every row from the start of a sentence (a zero state)."""
        return self.run(input_ids)[0]

    def run(self, input_ids: np.ndarray, state: tuple | None = None):
        """``(logits, state_out)`` for int32 ids [batch, time], right-padded with 0.

        ``state``: None (zeros: every row starts a sentence) or ``(h, c)`` float32
        [layers, batch, units], the state before the first position (format 2 only).
        ``state_out``: ``(h, c)`` after each row's last real position (None for format 1).
        """
        if self.loss_head:
            raise InvalidArgumentError(f"{self.name} was opened with the loss head: it returns per-token "
                             "log-probabilities (run_head), not logits")
        ids = self._ids(input_ids)
        (logits,), state_out = self._run(ids, {}, [OUTPUT_NAME], state)
        if logits.shape[-1] != len(self.vocab):
            raise ArtifactError(self._width_mismatch(logits.shape[-1]))
        return logits, state_out

    def run_head(self, input_ids: np.ndarray, targets: np.ndarray, state: tuple | None = None):
        """``(token_logprob float32 [B, T], token_hit bool [B, T], state_out)`` from the loss
        head (sessions opened with ``loss_head``): log p(target) in nats and whether the target
        is the first argmax, at every position (padding included: mask them)."""
        if not self.loss_head:
            raise InvalidArgumentError(f"{self.name} was opened without the loss head")
        ids = self._ids(input_ids)
        targets = np.ascontiguousarray(targets, dtype=np.int32)
        if targets.shape != ids.shape:
            raise InvalidArgumentError(f"targets shape {targets.shape} != input_ids shape {ids.shape}")
        (logprob, hit), state_out = self._run(ids, {TARGETS: targets},
                                              [TOKEN_LOGPROB, TOKEN_HIT], state)
        return logprob, hit, state_out

    @staticmethod
    def _ids(input_ids) -> np.ndarray:
        ids = np.ascontiguousarray(input_ids, dtype=np.int32)
        if ids.ndim != 2:
            raise InvalidArgumentError(f"input_ids must be [batch, time], got shape {ids.shape}")
        return ids

    def _run(self, ids: np.ndarray, feeds: dict, names: list[str], state):
        """One onnxruntime call: ``(outputs named ``names``, state_out or None)``."""
        feeds = {INPUT_NAME: ids, **feeds}
        if self.stateful:
            if state is None:
                state = self.zero_state(ids.shape[0])
            expected = (self.num_layers, ids.shape[0], self.num_units)
            for name, value in zip(STATE_INPUTS, state):
                value = np.ascontiguousarray(value, dtype=np.float32)
                if value.shape != expected:
                    raise InvalidArgumentError(f"{name} must be [layers, batch, units] = {expected}, "
                                     f"got {value.shape}")
                feeds[name] = value
            names = [*names, *STATE_OUTPUTS]
        elif state is not None:
            self.require_state("carrying the LSTM state")
        try:
            if self.provider == CUDA:
                # IO binding: inputs copied once from host memory; outputs (the small [B, T]
                # head values and the state) come back to the host once.
                binding = self._session.io_binding()
                for name, value in feeds.items():
                    binding.bind_cpu_input(name, value)
                for name in names:
                    binding.bind_output(name, "cpu")
                self._session.run_with_iobinding(binding)
                results = [v.numpy() for v in binding.get_outputs()]
            else:
                results = self._session.run(names, feeds)
        except Exception as exc:  # onnxruntime's own types (Fail, RuntimeException, ...)
            raise InferenceError(
                f"onnxruntime failed on a batch of shape {ids.shape}: {_first_line(exc, 300)}") from exc
        count = len(names) - (2 if self.stateful else 0)
        return results[:count], (tuple(results[count:]) if self.stateful else None)

    def __repr__(self) -> str:
        return (f"ModelSession({self.name!r}, provider={self.provider!r}, "
                f"vocab_size={self.vocab_size})")
