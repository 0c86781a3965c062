"""Open an lmonnx ``.onnx`` with onnxruntime: metadata, execution provider, logits.

No TensorFlow here.  Every onnxruntime session lmonnx makes -- for scoring, evaluation and
export's self-check -- is built by :class:`ModelSession` from a path or from the model's bytes,
with the same options and the same signature and metadata checks, all at load: a foreign graph
(other dtypes or ranks, no LSTM state) is refused before the first batch.  Formats 2 (the
LSTM state in and out, logits) and 3 (the factored softmax: head logits and hidden states, the
tail clusters run as small sessions of their own, ``lmonnx.factored``) are read; a format-1
file is refused with "re-export this model".
Provider choice is never silent:

  ``"auto"``  CUDA when onnxruntime-gpu can really use a GPU, else CPU; the reason for a CPU
             fallback is kept in ``ModelSession.provider_note`` (shown in the evaluation
             report's provider line) and logged at debug level (logger ``lmonnx``);
  ``"cpu"``   CPU only;
  ``"cuda"``  CUDA or a :class:`~lmonnx.errors.ProviderError` that says why not.

Inputs and outputs go through ``InferenceSession.run`` (host arrays) on every provider.  On
CUDA the session carries the loss head, so what comes back to the host is [batch, time]
values and the state, never the logits.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

import numpy as np

from lmonnx.errors import (ArgumentTypeError, ArtifactError, InferenceError,
                           InvalidArgumentError, MissingDependencyError, PathIsDirectoryError,
                           PathNotFoundError, ProviderError, first_line)
from lmonnx.validation import check_choice, check_optional_int

try:
    import onnxruntime as ort
except ImportError:  # both onnxruntime and onnxruntime-gpu provide the module
    raise MissingDependencyError(
        "scoring needs an ONNX Runtime: install exactly one of the extras 'lmonnx[cpu]' "
        "(onnxruntime) or 'lmonnx[gpu]' (onnxruntime-gpu, also runs on CPU)") from None

from lmonnx.artifact import (HEAD_OUTPUT, HIDDEN_OUTPUT, INPUT_NAME, OUTPUT_NAME,
                             STATE_INPUTS, STATE_OUTPUTS, ArtifactMetadata, format_1_refused,
                             parse_metadata)
from lmonnx.factored import TailLayers, tail_names
from lmonnx.graph import TARGETS, TOKEN_HIT, TOKEN_LOGPROB, add_loss_head

log = logging.getLogger("lmonnx")

PROVIDER_CHOICES = ("auto", "cpu", "cuda")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

_INT8_ON_CPU_ONLY = ("this int8 model runs on CPU only (DynamicQuantizeLSTM and MatMulInteger "
                     "have no CUDA kernels); use the fp32 model on CUDA")


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
        options.intra_op_num_threads = num_threads
    # onnxruntime's intra-op threads spin after each run by default; in evaluation the kernel
    # runs next on the same cores, and spinning threads steal them (PTB test, 2 cores:
    # 15-20% slower with spinning, every batch size and budget tried).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # our own messages say what matters; ORT's warnings are noise
    return options


def _resolve_source(model, name: str | None) -> tuple[bytes | Path, Path | None, str]:
    """``(source, path or None, name)`` of a model given as a path or as its bytes."""
    if isinstance(model, (bytes, bytearray)):
        return bytes(model), None, name or "<model bytes>"
    if not isinstance(model, (str, os.PathLike)):
        raise ArgumentTypeError(f"model must be a path or bytes, got {type(model).__name__}")
    path = Path(os.fspath(model))
    if path.is_dir():
        raise PathIsDirectoryError(f"model path is a directory, not an .onnx file: {path}")
    if not path.exists():
        raise PathNotFoundError(f"model not found: {path} (create one with `lmonnx export`)")
    return path, path, name or str(path)


def _wanted_providers(choice: str) -> tuple[list[str], str]:
    """``(onnxruntime providers to ask for, why CUDA is not among them or "")``."""
    if choice == "cpu":
        return [CPU], ""
    reason = cuda_unavailable_reason()
    if reason is None:
        return [CUDA, CPU], ""
    if choice == "cuda":
        raise ProviderError(f"--providers cuda: CUDA is not usable: {reason}")
    return [CPU], f"CUDA not used: {reason}"


def _type_text(arg) -> str:
    return f"{arg.type} of rank {len(arg.shape)}" if arg.shape is not None else arg.type


class ModelSession:
    """An lmonnx model (format 2 or 3) opened in onnxruntime.

    Attributes: ``path`` (None when opened from bytes), ``source`` (the path or the bytes),
    ``name``, ``metadata`` (vocabulary, config, training record), ``vocab``,
    ``num_layers`` and ``num_units`` (the LSTM state is float32 [layers, batch, units]),
    ``provider`` (the provider actually running the graph), ``provider_note`` (why CUDA is
    not used, when ``auto`` fell back to CPU), ``num_threads``, ``loss_head``.
    """

    def __init__(self, model, providers: str = "auto", num_threads: int | None = None, *,
                 name: str | None = None, loss_head: bool | None = None):
        """``model``: a path to an ``.onnx`` file, or the serialized model as ``bytes`` (export
        checks the model it is about to write this way); ``name`` labels it in messages.
        ``loss_head``: compute per-position log-probabilities and hits in the graph
        (``lmonnx.graph``); None = on CUDA only, where the logits must stay on the device."""
        self.provider_choice = check_choice("providers", providers, PROVIDER_CHOICES)
        self.num_threads = check_optional_int("num_threads", num_threads)
        self.source, self.path, self.name = _resolve_source(model, name)
        wanted, self.provider_note = _wanted_providers(providers)
        # On CUDA the loss is computed in the graph so the logits stay on the device.
        self.loss_head = (CUDA in wanted) if loss_head is None else bool(loss_head)
        self._open(self._graph(), wanted)
        if CUDA in wanted and self.provider != CUDA:
            if providers == "cuda":
                raise ProviderError("--providers cuda: onnxruntime could not start the CUDA provider")
            self.provider_note = "CUDA not used: onnxruntime could not start the CUDA provider"
        self._check_signature()
        self.metadata: ArtifactMetadata = parse_metadata(
            self._session.get_modelmeta().custom_metadata_map, self.name)
        self.vocab = self.metadata.vocab
        self.quantization = self.metadata.quantization
        if self.quantization and self.provider == CUDA:
            self._reopen_int8_on_cpu(head_only_for_cuda=loss_head is None)
        if self.provider_note:
            log.debug("%s: %s; running on CPU", self.name, self.provider_note)
        self._check_state_shape()
        self.tails: TailLayers | None = None
        if self.factored:
            self.tails = self._read_tails()
        else:
            self._check_vocab_width()

    def _graph(self) -> bytes | str:
        """What onnxruntime opens: the file (its path) or bytes, the loss head added if asked."""
        self._declared_width = None
        if not self.loss_head:
            return self.source if isinstance(self.source, bytes) else str(self.source)
        raw = self.source if isinstance(self.source, bytes) else self.source.read_bytes()
        try:
            headed = add_loss_head(raw)
            if headed is None:  # format 3: no logits to reduce on the device
                self.loss_head = False
                return self.source if isinstance(self.source, bytes) else str(self.source)
            graph, self._declared_width = headed
        except ImportError:  # onnx missing: say which extra, not "unreadable model"
            raise
        except Exception as exc:  # a file onnx cannot parse: the session would say so too
            raise ArtifactError(f"{self.name} is not a readable ONNX model: "
                                f"{first_line(exc, 200)}") from None
        return graph

    def _reopen_int8_on_cpu(self, head_only_for_cuda: bool) -> None:
        """int8 ops have no CUDA kernels: refuse ``cuda``, or reopen on CPU for ``auto``
        (without the loss head when it was there only for CUDA)."""
        if self.provider_choice == "cuda":
            raise ProviderError(f"--providers cuda: {self.name}: {_INT8_ON_CPU_ONLY}")
        self.provider_note = f"CUDA not used: {_INT8_ON_CPU_ONLY}"
        if head_only_for_cuda:
            self.loss_head = False
        self._open(self._graph(), [CPU])

    def _open(self, source, providers: list[str]) -> None:
        try:
            self._session = ort.InferenceSession(source, sess_options=_session_options(
                self.num_threads), providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise ArtifactError(f"{self.name} is not a readable ONNX model: "
                                f"{first_line(exc, 200)}") from None
        self.provider = self._session.get_providers()[0]

    def _check_signature(self) -> None:
        """Names, dtypes and ranks of the graph's inputs and outputs, at load."""
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name: o for o in self._session.get_outputs()}
        self.factored = HEAD_OUTPUT in outputs
        scores = ([TOKEN_LOGPROB, TOKEN_HIT] if self.loss_head else
                  [HEAD_OUTPUT, HIDDEN_OUTPUT] if self.factored else [OUTPUT_NAME])
        extra = [TARGETS] if self.loss_head else []
        if sorted(inputs) == sorted([INPUT_NAME, *extra]):
            raise ArtifactError(format_1_refused(self.name))
        if (sorted(inputs) != sorted([INPUT_NAME, *extra, *STATE_INPUTS])
                or not {*scores, *STATE_OUTPUTS} <= set(outputs)):
            raise ArtifactError(
                f"{self.name} is not an lmonnx model: expected inputs {INPUT_NAME!r}, "
                f"{'/'.join(STATE_INPUTS)} and outputs {OUTPUT_NAME!r}, "
                f"{'/'.join(STATE_OUTPUTS)}; found inputs {sorted(inputs)} and outputs "
                f"{sorted(outputs)}")
        expected = {INPUT_NAME: ("tensor(int32)", 2), TARGETS: ("tensor(int32)", 2),
                    OUTPUT_NAME: ("tensor(float)", 3), TOKEN_LOGPROB: ("tensor(float)", 2),
                    HEAD_OUTPUT: ("tensor(float)", 3), HIDDEN_OUTPUT: ("tensor(float)", 3),
                    **{n: ("tensor(float)", 3) for n in (*STATE_INPUTS, *STATE_OUTPUTS)}}
        for arg in [*inputs.values(), *(outputs[n] for n in (*scores, *STATE_OUTPUTS))]:
            dtype, rank = expected.get(arg.name, (arg.type, None))
            if arg.type != dtype or (rank is not None and arg.shape is not None
                                     and len(arg.shape) != rank):
                raise ArtifactError(
                    f"{self.name}: {arg.name!r} is {_type_text(arg)}, an lmonnx model has "
                    f"{dtype} of rank {rank} (float32 logits and state, int32 ids): "
                    "re-export this model")

    def _check_state_shape(self) -> None:
        """The state inputs' declared shape against the config (parse_metadata has already
        checked the format version: 2 is the only one read)."""
        shape = {i.name: i.shape for i in self._session.get_inputs()}[STATE_INPUTS[0]]
        config = self.metadata.config
        self.num_layers = int(config.get("num_lstm_layers", shape[0]))
        self.num_units = int(config.get("num_lstm_units", shape[-1]))
        for declared, expected in ((shape[0], self.num_layers), (shape[-1], self.num_units)):
            if isinstance(declared, int) and declared != expected:
                raise ArtifactError(
                    f"{self.name}: state inputs are {shape} but the config says "
                    f"{self.num_layers} layers of {self.num_units} units")

    def _read_tails(self) -> TailLayers:
        """A format-3 model's tail clusters, read from the file's initializers (onnxruntime
        has no API for them; the ``onnx`` package reads them, without the external data
        that lmonnx files never have)."""
        try:
            import onnx
            from onnx import numpy_helper
        except ImportError:
            raise MissingDependencyError("a factored (format 3) model's tail clusters are read "
                                         "with the onnx package: pip install onnx") from None
        source = self.source
        proto = (onnx.load_from_string(source) if isinstance(source, bytes)
                 else onnx.load(str(source)))
        inits = {i.name: i for i in proto.graph.initializer if i.name.startswith("lmonnx_tail_")}
        cutoffs = tuple(self.metadata.config["cutoffs"])
        weights = []
        for k in range(len(cutoffs) - 1):
            names = tail_names(k)
            missing = [n for n in names if n not in inits]
            if missing:
                raise ArtifactError(f"{self.name}: a format-3 model without its tail cluster "
                                    f"{k} ({', '.join(missing)}); re-export this model")
            weights.append([numpy_helper.to_array(inits[n]).astype(np.float32) for n in names])
        (head,) = [o for o in self._session.get_outputs() if o.name == HEAD_OUTPUT]
        width = head.shape[-1] if head.shape else None
        if isinstance(width, int) and width != cutoffs[0] + len(weights):
            raise ArtifactError(f"{self.name}: head_logits has {width} entries per position but "
                                f"the cutoffs {list(cutoffs)} make a head of {cutoffs[0]} words "
                                f"and {len(weights)} clusters; re-export this model")
        tails = TailLayers(cutoffs, *(tuple(w[i] for w in weights) for i in range(3)),
                           runner=self._tail_runner(weights))
        for k, (projection, kernel, bias) in enumerate(weights):
            size = cutoffs[k + 1] - cutoffs[k]
            if (projection.shape[0] != self.num_units or kernel.shape != (projection.shape[1], size)
                    or bias.shape != (size,)):
                raise ArtifactError(f"{self.name}: tail cluster {k}'s weights {projection.shape}, "
                                    f"{kernel.shape}, {bias.shape} do not fit {self.num_units} "
                                    f"units and {size} words; re-export this model")
        return tails

    def _tail_runner(self, weights):
        """``run(k, hidden [n, units]) -> logits [n, size_k]``: one small onnxruntime session
        per tail cluster (``lmonnx.graph.tail_cluster_model``), on the CPU (the rows are
        gathered on the host), with this session's options."""
        from lmonnx.graph import tail_cluster_model

        sessions = [ort.InferenceSession(
            tail_cluster_model(k, *arrays),
            sess_options=_session_options(self.num_threads), providers=[CPU])
            for k, arrays in enumerate(weights)]

        def run(k: int, hidden: np.ndarray) -> np.ndarray:
            try:
                return sessions[k].run(["logits"], {"hidden": hidden})[0]
            except Exception as exc:  # onnxruntime's own types
                raise InferenceError(f"onnxruntime failed on tail cluster {k} for "
                                     f"{hidden.shape[0]} rows: {first_line(exc, 300)}") from exc
        return run

    def zero_state(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """(h, c) float32 [layers, batch, units] of zeros: the start of a sentence."""
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

    @property
    def scored_width(self) -> int:
        """float32 values per position that scoring a known text holds: the logits (V) of a
        full-softmax model; a factored model's head logits and hidden state (c_0 + clusters +
        units), its tail clusters coming only for the targets in them.  What the batch budget
        (:func:`lmonnx.metrics.default_max_tokens`) is sized by."""
        if self.factored:
            return self.tails.head_size + self.tails.clusters + self.num_units
        return self.vocab_size

    @property
    def output_macs(self) -> int:
        """Multiply-adds of the output layer at one padded position when scoring a known
        text: (units + 1) x V for a full softmax; the head alone for a factored model (its
        tail clusters run on the gathered real targets, never on padding)."""
        width = self.tails.head_size + self.tails.clusters if self.factored else self.vocab_size
        return (self.num_units + 1) * width

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """float32 [batch, time, vocab_size] logits of int32 ids [batch, time] (0 = padding),
        every row from the start of a sentence: ``run(input_ids)[0]``."""
        return self.run(input_ids)[0]

    def run(self, input_ids: np.ndarray, state: tuple | None = None):
        """``(logits, state_out)`` for int32 ids [batch, time], right-padded with 0.

        ``state``: None (zeros: every row starts a sentence) or ``(h, c)`` float32
        [layers, batch, units], the state before the first position.  ``state_out``:
        ``(h, c)`` after each row's last real position.  A factored (format 3) model's
        "logits" are its log-probabilities over every word, every tail cluster computed: the
        same distribution (use :meth:`score_targets` to score known targets, much cheaper).
        """
        if self.loss_head:
            raise InvalidArgumentError(f"{self.name} was opened with the loss head: it returns "
                                       "per-token log-probabilities (run_head), not logits")
        ids = self._ids(input_ids)
        if self.factored:
            (head, hidden), state_out = self._run(ids, {}, [HEAD_OUTPUT, HIDDEN_OUTPUT], state)
            return self.tails.log_probs(head, hidden), state_out
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

    def score_targets(self, input_ids: np.ndarray, targets: np.ndarray, mask: np.ndarray,
                      state: tuple | None = None, num_threads: int | None = None):
        """``(nll float64 [B, T] in nats, 0 where ``mask`` is 0; top-1 hits bool [B, T];
        state_out)`` of a factored model: the head from onnxruntime, each tail cluster only
        for the positions that need it (``TailLayers.target_scores``)."""
        if not self.factored:
            raise InvalidArgumentError(f"{self.name} is not a factored model: score its logits")
        ids = self._ids(input_ids)
        (head, hidden), state_out = self._run(ids, {}, [HEAD_OUTPUT, HIDDEN_OUTPUT], state)
        nll, hits = self.tails.target_scores(head, hidden, targets, mask,
                                             num_threads=num_threads)
        return nll, hits, state_out

    @staticmethod
    def _ids(input_ids) -> np.ndarray:
        ids = np.ascontiguousarray(input_ids, dtype=np.int32)
        if ids.ndim != 2:
            raise InvalidArgumentError(f"input_ids must be [batch, time], got shape {ids.shape}")
        return ids

    def _state_feeds(self, state, batch: int) -> dict[str, np.ndarray]:
        if state is None:
            state = self.zero_state(batch)
        expected = (self.num_layers, batch, self.num_units)
        feeds = {}
        for name, value in zip(STATE_INPUTS, state):
            value = np.ascontiguousarray(value, dtype=np.float32)
            if value.shape != expected:
                raise InvalidArgumentError(f"{name} must be [layers, batch, units] = {expected}, "
                                           f"got {value.shape}")
            feeds[name] = value
        return feeds

    def _run(self, ids: np.ndarray, feeds: dict, names: list[str], state):
        """One onnxruntime call: ``(outputs named ``names``, state_out)``."""
        feeds = {INPUT_NAME: ids, **feeds, **self._state_feeds(state, ids.shape[0])}
        try:
            results = self._session.run([*names, *STATE_OUTPUTS], feeds)
        except Exception as exc:  # onnxruntime's own types (Fail, RuntimeException, ...)
            raise InferenceError(f"onnxruntime failed on a batch of shape {ids.shape}: "
                                 f"{first_line(exc, 300)}") from exc
        return results[:len(names)], tuple(results[len(names):])

    def __repr__(self) -> str:
        return (f"ModelSession({self.name!r}, provider={self.provider!r}, "
                f"vocab_size={self.vocab_size})")
