"""Shared pytest setup. The package is installed editable (``pip install -e .``), so no path hacks;
pytest's default ``prepend`` import mode puts this directory on ``sys.path`` for ``hf_fixtures``."""
import numpy as np
import pytest


@pytest.fixture
def np_rng(request):
    """A numpy Generator seeded from the test's node id (stable across runs and test orderings)."""
    import zlib

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
