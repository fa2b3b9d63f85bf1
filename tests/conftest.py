import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# tests/models.py (tiny model factories) is imported as ``models`` from every test folder
sys.path.insert(0, str(Path(__file__).parent))
