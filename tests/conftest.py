from __future__ import annotations

import os
import sys
from pathlib import Path

# One test process holds torch's, ONNX Runtime's, llama.cpp's and the native engine's thread pools
# at once; OpenMP threads that spin at barriers starve each other on 2 cores (a 15x slowdown
# measured on the tiny models). Set before any of them loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py: shared tiny-model builders

from tiny import ARCHS, hf_model  # noqa: E402


@pytest.fixture(params=ARCHS)
def arch_name(request) -> str:
    return request.param


@pytest.fixture
def tiny(arch_name):
    """(transformers model, TorchRuntime) on the same tiny random weights."""
    from sparsedge import arch
    from sparsedge.runtimes.torch_ref import TorchRuntime

    m = hf_model(arch_name)
    spec = arch.spec_from_hf(m.config)
    return m, TorchRuntime(spec, arch.canonical_weights(spec, m.state_dict()))


@pytest.fixture(scope="session")
def real_model():
    """The built-in default model (pulled into the user cache on first use)."""
    from sparsedge import load

    return load("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def real_runtime(real_model):
    from sparsedge import open_runtime

    return open_runtime(real_model, "torch")
