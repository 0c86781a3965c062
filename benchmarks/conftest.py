"""Benchmark collection: ``bench_*.py`` files are test modules, and ``kernel_peers`` imports.

pytest's default pattern only collects ``test_*.py``; ``make test`` runs
``pytest benchmarks --benchmark-disable`` so that every ``bench_*.py`` runs once and cannot rot.
"""

import sys
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # whatever pytest's import mode, the benchmark files share helpers
    sys.path.insert(0, _HERE)


def pytest_collect_file(file_path, parent):
    # Files named on the command line are collected by pytest itself; do not collect them twice.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
