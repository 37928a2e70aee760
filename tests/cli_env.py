"""The environment of the `asvd` processes that the tests start: this process's (the XLA flags
of tests/conftest.py included, so that both compile the same programs and share them through
the run's compilation cache), on CPU."""

import os

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
