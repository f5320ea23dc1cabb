"""pytest-benchmark entry: `pytest bench --benchmark-only` runs every quick case per provider."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
