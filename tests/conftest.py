"""Shared fixtures.  Tests that read the PTB text in ../shared/data skip when it is absent."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def ptb_dir() -> Path:
    """Directory holding ptb.valid.txt and ptb.test.txt; skips the test when it is absent."""
    if not (SHARED_DATA / "ptb.valid.txt").is_file() or not (SHARED_DATA / "ptb.test.txt").is_file():
        pytest.skip(f"PTB data not found in {SHARED_DATA}")
    return SHARED_DATA
