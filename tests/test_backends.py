"""The backend registry: built-ins, third-party entry points, selection, clear errors."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from qgate import backends
from qgate.backends import fake_quantize
from qgate.errors import UsageError


def test_reference_is_default_on_cpu():
    assert backends.get_backend(None, device="cpu").name == "reference"
    assert "reference" in backends.list_backends()


def test_unknown_backend_lists_valid_names():
    with pytest.raises(UsageError) as err:
        backends.get_backend("nope")
    assert "unknown backend 'nope'" in str(err.value) and "reference" in str(err.value)


def test_third_party_backend_from_entry_point(tmp_path, monkeypatch):
    # A real installed distribution on sys.path: a package plus dist-info with entry_points.txt.
    pkg = tmp_path / "negbackend"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        from qgate.backends.base import Backend
        class NegatingBackend(Backend):
            name = "negate"
            def supports(self, device, dtype):
                return True
            def fake_quantize(self, x, fmt):
                return -x
    """))
    info = tmp_path / "negbackend-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: negbackend\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[qgate.backends]\nnegate = negbackend:NegatingBackend\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(backends, "_instances", {})
    assert "negate" in backends.list_backends()
    x = torch.randn(2, 32)
    assert torch.equal(fake_quantize(x, "mxfp4", backend="negate"), -x)
    sys.modules.pop("negbackend", None)


def test_unavailable_triton_is_a_clear_error_not_a_traceback():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    try:
        backend = backends.get_backend("triton")
    except UsageError as err:
        assert "triton" in str(err)
    else:  # triton importable without a GPU: it must then refuse CPU tensors cleanly
        assert not backend.supports("cpu", torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "fp8", "fp8_channel", "mxint8"])
def test_reference_on_cuda_matches_reference_on_cpu(fmt):
    # CUDA rewrites tensor / python_float as a reciprocal multiply; the reference must not depend on it
    x = torch.randn(512, 1024) * torch.logspace(-6, 6, 512).unsqueeze(1)
    on_cpu = fake_quantize(x, fmt, backend="reference")
    on_gpu = fake_quantize(x.cuda(), fmt, backend="reference").cpu()
    assert torch.equal(on_cpu, on_gpu)
