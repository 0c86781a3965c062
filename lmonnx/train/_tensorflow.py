"""TensorFlow's start-up, quiet: imported by :mod:`lmonnx.train.model` before Keras."""

import contextlib
import os
import sys


@contextlib.contextmanager
def _native_stderr_silenced():
    """Send file descriptor 2 to /dev/null for a moment: TensorFlow's C++ start-up lines
    (oneDNN, CUDA stubs, CPU features) are written there before any log level applies.
    Python exceptions are unaffected; they are printed after the descriptor is restored."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (embedded interpreters): change nothing
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


if "tensorflow" not in sys.modules and "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
    # Quiet by default (TensorFlow errors still surface as Python exceptions); set
    # TF_CPP_MIN_LOG_LEVEL yourself, e.g. to 0, to see its native log lines.
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    with _native_stderr_silenced():
        import tensorflow as _tf

        _tf.config.list_physical_devices()  # CUDA probing logs happen here, not at import
