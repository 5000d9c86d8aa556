"""Fixtures shared by the test modules."""
from __future__ import annotations

import pytest
import torch

from rampde_fx import runtime


@pytest.fixture
def fresh_dynamo():
    """dynamo's caches empty before and after the test (its recompile limits count per
    process)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def cheap_steps(fresh_dynamo):
    """Compile the inner step kernels with aot_eager: the structure is the same, code
    generation is skipped."""
    with runtime.patch(kernel_backend="aot_eager"):
        yield
