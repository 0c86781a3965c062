"""TensorFlow's start-up, quiet: imported by :mod:`lmonnx.train.model` before Keras."""

import os
import sys

from lmonnx.native_stderr import native_stderr_silenced


if "tensorflow" not in sys.modules and "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
    # Quiet by default (TensorFlow errors still surface as Python exceptions); set
    # TF_CPP_MIN_LOG_LEVEL yourself, e.g. to 0, to see its native log lines.
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    with native_stderr_silenced():
        import tensorflow as _tf

        _tf.config.list_physical_devices()  # CUDA probing logs happen here, not at import
