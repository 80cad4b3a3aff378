"""Test-wide environment, set before any test imports JAX's backends.

JAX runs on the CPU in the tests even where libtpu is installed (for the ahead-of-time
TPU compiles): no TPU metadata-server queries, and several test processes may load
libtpu at once (pytest-xdist workers, the multi-device subprocesses).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
