"""Make the flat top-level scripts importable from tests/ and keep torch to the machine's 2 cores."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
