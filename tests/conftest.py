import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Generator(compile="auto") — the default — runs the fx graphs in tests; the tests of the compiled
# default path (tests/runtime/test_compiled.py) unset this in the process they start
os.environ.setdefault("TOKENFX_COMPILE", "0")

# tests/models.py (tiny model factories) is imported as ``models`` from every test folder
sys.path.insert(0, str(Path(__file__).parent))


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: on this shared 2-core machine oversubscribing made the
    generation tests ~10x slower. Modules opt in with ``pytestmark = pytest.mark.usefixtures``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
