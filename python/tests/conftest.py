"""Shared fixtures and markers of the moe_router tests.

- `requires_cuda`: the CUDA variants; skipped LOUDLY (reason "SKIPPED: no CUDA device")
  on machines without a GPU.
- `assert_close_f32`: the f32 tolerance of docs/semantics.md §1.7 (rtol 1.3e-6, atol 1e-5).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # `import reference` from every test file

import moe_router  # noqa: E402
from moe_router import ops as _ops  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="SKIPPED: no CUDA device (CUDA variants run on a GPU machine)")

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close_f32(actual, expected, *, rtol=1.3e-6, atol=1e-5, msg=""):
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64), rtol=rtol, atol=atol, msg=msg)


def pytest_report_header(config):
    return [
        f"moe_router {moe_router.__version__} ({os.path.dirname(moe_router.__file__)}), torch {torch.__version__}",
        f"native ops: {len(_ops.NATIVE_OPS)}; CUDA device: {HAS_CUDA}",
    ]


@pytest.fixture(autouse=True)
def _deterministic_torch_threads():
    # Keep torch's own intra-op threads modest on the 2-core CI machine.
    prev = torch.get_num_threads()
    torch.set_num_threads(min(prev, 2))
    yield
    torch.set_num_threads(prev)
