import os
import sys

from hypothesis import settings

# Test helpers (reference implementations, multi-process utilities) live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))

# CI runs the property tests with a fixed seed sequence so that a red run is
# reproducible; locally they explore new examples each run.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
