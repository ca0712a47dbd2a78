"""The device path of a backend: the same results on CUDA as on the CPU (runs where a GPU is lent)."""

import pytest
import torch

from dmoe.node.backend import ExpertBackend
from dmoe.node.config import NodeConfig
from dmoe.node.experts import build_backend, resolve_device

pytestmark = [pytest.mark.timeout(120), pytest.mark.gpu]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def make(device: str) -> ExpertBackend:
    return build_backend("ffn.0", NodeConfig(expert_cls="ffn", hidden_dim=64, lr=1e-3), torch.device(device))


def test_auto_device_matches_what_torch_sees():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


@needs_cuda
def test_cuda_backend_matches_cpu():
    cpu, gpu = make("cpu"), make("cuda")
    x, g = torch.randn(32, 64), torch.randn(32, 64)
    torch.testing.assert_close(gpu.forward([x])[0], cpu.forward([x])[0], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(gpu.backward([x], [g])[0], cpu.backward([x], [g])[0], rtol=1e-3, atol=1e-4)
    assert gpu.version == cpu.version == 1
    torch.testing.assert_close(gpu.forward([x])[0], cpu.forward([x])[0], rtol=1e-3, atol=1e-4)
