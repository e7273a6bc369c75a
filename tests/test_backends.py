"""The backend registry: built-ins, third-party entry points, selection, clear errors."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from qgate import backends
from qgate.backends import Backend, fake_quantize
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


class _CudaMxfp4Only(Backend):
    """A backend for CUDA bf16 tensors and mxfp4 only."""

    name = "narrow"

    def supports(self, device, dtype):
        return torch.device(device).type == "cuda" and dtype == torch.bfloat16

    def supports_format(self, fmt):
        return fmt.name == "mxfp4"

    def fake_quantize(self, x, fmt):
        return x


def test_get_backend_consults_supports_and_names_what_is_supported(monkeypatch):
    monkeypatch.setattr(backends, "_instances", {"narrow": _CudaMxfp4Only()})
    with pytest.raises(UsageError) as err:
        backends.get_backend("narrow", device="cpu")
    assert str(err.value) == ("backend 'narrow' does not run on cpu; it supports bfloat16 tensors on cuda; "
                              "formats: mxfp4")
    with pytest.raises(UsageError) as err:
        fake_quantize(torch.zeros(2, 32), "nvfp4", backend="narrow")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("backend 'narrow' does not support nvfp4 on cpu (float32);")
    assert message.endswith("it supports bfloat16 tensors on cuda; formats: mxfp4")
    with pytest.raises(UsageError, match=r"backend 'narrow' does not support nvfp4 on cuda \(bfloat16\);"):
        backends.get_backend("narrow", device="cuda", fmt="nvfp4", dtype=torch.bfloat16)
    assert backends.get_backend("narrow", device="cuda", fmt="mxfp4", dtype=torch.bfloat16).name == "narrow"
    with pytest.raises(UsageError, match=r"backend 'reference' does not support mxfp4 on cpu \(int32\); it supports "
                                         r"float32, float16, bfloat16 tensors on cpu and cuda; formats: every format"):
        backends.get_backend(None, device="cpu", fmt="mxfp4", dtype=torch.int32)


def test_best_backend_is_picked_among_those_that_support_the_format(monkeypatch):
    narrow = _CudaMxfp4Only()
    monkeypatch.setattr(backends, "_instances", {"triton": narrow})  # stands in for the GPU backend
    assert backends.get_backend(None, device="cuda", fmt="mxfp4", dtype=torch.bfloat16) is narrow
    assert backends.get_backend(None, device="cuda", fmt="nvfp4", dtype=torch.bfloat16).name == "reference"
    assert backends.get_backend(None, device="cuda", fmt="mxfp4", dtype=torch.float32).name == "reference"


def test_quantize_model_checks_every_format_before_changing_a_tensor(monkeypatch):
    from qgate.models import build_tiny_model
    from qgate.quantize import quantize_model

    class CpuMxfp4Only(_CudaMxfp4Only):
        def supports(self, device, dtype):
            return True

    monkeypatch.setattr(backends, "_instances", {"narrow": CpuMxfp4Only()})
    model = build_tiny_model("qwen2")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(UsageError, match=r"backend 'narrow' does not support mxfp6_e2m3; .*formats: mxfp4$"):
        quantize_model(model, "mxfp4", "mixed-fp4", backend="narrow", progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
