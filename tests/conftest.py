from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Read by `datasets` and `huggingface_hub` at import time: set before any test module imports them.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Token streams and tokenizers go to a per-session cache, never the user's."""
    os.environ["LMHEADS_CACHE"] = str(tmp_path_factory.mktemp("lmheads-cache"))
    # The test processes share the cores: torch's threads spinning against each other's would make every
    # process several times slower. The runs a test starts as new processes inherit the share.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    threads = max(1, min(2, (os.cpu_count() or 1) // workers))
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


@pytest.fixture(autouse=True)
def _fresh_compiler():
    """Each test compiles from scratch: torch counts the compilations of one function across the whole
    process and, past its recompile limit (8), silently runs that function eager, so later tests of the
    compiled chunk step (many shapes, one function) would test eager code."""
    torch.compiler.reset()


@pytest.fixture
def shared_data() -> Path:
    """The reference corpora (WikiText-2, Tiny Shakespeare); tests needing them skip without them."""
    if not (SHARED_DATA / "wikitext-2" / "train.txt").is_file():
        pytest.skip("reference corpora not available")
    return SHARED_DATA


def pytest_collection_modifyitems(config, items):
    # The slow tests first: the test processes then end at about the same time, not one of them still
    # running a minute-long test after the others have finished.
    items.sort(key=lambda item: "slow" not in item.keywords)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
