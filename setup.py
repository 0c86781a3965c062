"""Build description of the one compiled extension, ``lmonnx._xent``.

Everything else (metadata, dependencies) lives in pyproject.toml.  The C core in ``csrc/`` is
portable by default: no ``-march=native`` and no ``-ffast-math`` (fast-math assumes there is no
inf or NaN, and ``-inf`` logits are legal).  SIMD speed comes from runtime dispatch inside the C
code (AVX-512 / AVX2+FMA / scalar, chosen by a CPU check).

Environment switches:
  LMONNX_NO_OPENMP=1  build without OpenMP (the kernel then runs serially).
  LMONNX_NATIVE=1     add -march=native for a local build (never for wheels).
"""

import os
import subprocess
import sys
import sysconfig
import tempfile

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _compiler_accepts(flags: list[str]) -> bool:
    """True when the C compiler builds and links a small OpenMP program with ``flags``."""
    cc = sysconfig.get_config_var("CC") or "cc"
    source = "#include <omp.h>\nint main(void){return omp_get_max_threads() < 1;}\n"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as fh:
            fh.write(source)
        cmd = cc.split() + [src, "-o", os.path.join(tmp, "probe")] + flags
        try:
            return subprocess.run(cmd, capture_output=True).returncode == 0
        except OSError:
            return False


compile_args = ["-O3", "-std=c99", "-fno-strict-aliasing", "-Wall"]
link_args: list[str] = []
macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]

if sys.platform != "win32":
    if _truthy("LMONNX_NO_OPENMP"):
        print("lmonnx: OpenMP disabled by LMONNX_NO_OPENMP", file=sys.stderr)
    elif _compiler_accepts(["-fopenmp"]):
        compile_args.append("-fopenmp")
        link_args.append("-fopenmp")
    else:
        print("lmonnx: compiler has no OpenMP; building the serial kernel", file=sys.stderr)
    if _truthy("LMONNX_NATIVE"):
        compile_args.append("-march=native")

extension = Extension(
    "lmonnx._xent",
    sources=["lmonnx/_xent.pyx", "csrc/logsumexp.c", "csrc/masked_xent.c"],
    include_dirs=["csrc", np.get_include()],
    define_macros=macros,
    extra_compile_args=compile_args,
    extra_link_args=link_args,
)

setup(
    ext_modules=cythonize(
        [extension],
        compiler_directives={"language_level": "3", "boundscheck": False},
    )
)
