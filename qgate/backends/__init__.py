"""Kernel backends: their registry (built-ins plus the entry-point group `qgate.backends`) and `fake_quantize`.

A third-party package registers a Backend subclass (or a factory returning one) under
[project.entry-points."qgate.backends"]; it is instantiated on first use.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import torch

from qgate.backends.base import Backend
from qgate.errors import UsageError
from qgate.formats import Format, get_format

ENTRY_POINT_GROUP = "qgate.backends"

# Built-ins by name -> "module:attr", so that importing qgate never imports triton.
_BUILTIN = {
    "reference": "qgate.backends.reference:ReferenceBackend",
    "triton": "qgate.backends.triton:TritonBackend",
}
_instances: dict[str, Backend] = {}


def _targets() -> dict[str, object]:
    targets: dict[str, object] = dict(_BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        targets.setdefault(ep.name, ep)
    return targets


def _instantiate(target) -> Backend:
    if isinstance(target, str):
        module, attr = target.split(":")
        factory = getattr(__import__(module, fromlist=[attr]), attr)
    else:
        factory = target.load()
    backend = factory()
    if not isinstance(backend, Backend):
        raise UsageError(f"backend {target!r} did not produce a qgate.backends.Backend")
    return backend


def list_backends() -> list[str]:
    return sorted(_targets())


def register_backend(name: str, backend: Backend) -> None:
    """Register an instance directly (tests, notebooks); entry points are the packaged way."""
    _instances[name] = backend


def _load(name: str) -> Backend | None:
    if name in _instances:
        return _instances[name]
    target = _targets().get(name)
    if target is None:
        return None
    try:
        backend = _instantiate(target)
    except ImportError:
        return None  # e.g. triton not installed: reported as unavailable, never a traceback
    _instances[name] = backend
    return backend


def get_backend(name: str | None = None, device: torch.device | str | None = None) -> Backend:
    """The backend called `name`; None picks the best available for `device` (triton on CUDA)."""
    if name is None:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type == "cuda":
            fast = _load("triton")
            if fast is not None and fast.available():
                return fast
        return _load("reference")
    valid = list_backends()
    if name not in _targets() and name not in _instances:
        raise UsageError(f"unknown backend {name!r}; expected one of: {', '.join(valid)}")
    backend = _load(name)
    if backend is None or not backend.available():
        raise UsageError(f"backend {name!r} is not available on this machine (its libraries or device are missing)")
    return backend


def fake_quantize(x: torch.Tensor, fmt: str | Format, backend: str | None = None) -> torch.Tensor:
    """Quantize and dequantize `x` in `fmt`; same shape and dtype, blocks along the last dimension."""
    f = get_format(fmt)
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise UsageError(f"fake_quantize expects a float32, float16 or bfloat16 tensor, got {got}")
    return get_backend(backend, device=x.device).fake_quantize(x, f)


__all__ = ["Backend", "fake_quantize", "get_backend", "list_backends", "register_backend", "ENTRY_POINT_GROUP"]
