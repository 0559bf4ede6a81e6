"""pytest runs with ``--import-mode=importlib``, which puts no test folder on
sys.path; this one is added so tests can import their helper modules by name."""

import sys
from pathlib import Path

TEST_DIR = Path(__file__).resolve().parent
if str(TEST_DIR) not in sys.path:
    sys.path.insert(0, str(TEST_DIR))
