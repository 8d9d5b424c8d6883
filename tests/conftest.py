import os
import sys

# Test helpers (reference implementations, multi-process utilities) live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))
