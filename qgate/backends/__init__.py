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


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _supports(backend: Backend, device: torch.device, dtype: torch.dtype | None) -> bool:
    """backend.supports for `dtype`, or for any float dtype when None; a backend that declares
    nothing (supports not implemented) is taken at its word that it runs anywhere."""
    try:
        return any(backend.supports(device, dt) for dt in ((dtype,) if dtype is not None else FLOAT_DTYPES))
    except NotImplementedError:
        return True


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _what_it_supports(backend: Backend) -> str:
    """'float32, float16, bfloat16 tensors on cuda; formats: every format' (probed through supports)."""
    from qgate.formats import list_formats

    combos = {}
    for dev in ("cpu", "cuda"):
        dtypes = [dt for dt in FLOAT_DTYPES if _supports(backend, torch.device(dev), dt)]
        if dtypes:
            combos.setdefault(", ".join(_dtype_name(dt) for dt in dtypes), []).append(dev)
    where = "; ".join(f"{dts} tensors on {' and '.join(devs)}" for dts, devs in combos.items()) or "no device"
    all_formats = list_formats()
    names = [f.name for f in all_formats if backend.supports_format(f)]
    formats = "every format" if len(names) == len(all_formats) else (", ".join(names) or "none")
    return f"{where}; formats: {formats}"


def check_support(backend: Backend, fmt: str | Format | None = None, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None, name: str | None = None) -> Backend:
    """`backend` if it can fake-quantize `fmt` on `device` with `dtype` (each checked when given),
    else one UsageError line naming the backend (`name`, default its own), what was asked and what it supports."""
    f = get_format(fmt) if fmt is not None else None
    dev = torch.device(device) if device is not None else None
    device_ok = dev is None or _supports(backend, dev, dtype)
    format_ok = f is None or backend.supports_format(f)
    if device_ok and format_ok:
        return backend
    where = " ".join(part for part in (
        f"on {dev}" if dev is not None else "",
        f"({_dtype_name(dtype)})" if dtype is not None else "",
    ) if part)
    asked = f"does not support {f.name} {where}" if f is not None else f"does not run {where}"
    raise UsageError(f"backend {name or backend.name!r} {asked.rstrip()}; it supports {_what_it_supports(backend)}")


def get_backend(name: str | None = None, device: torch.device | str | None = None,
                fmt: str | Format | None = None, dtype: torch.dtype | None = None) -> Backend:
    """The backend called `name`, checked (Backend.supports, supports_format) against `device`, `fmt`
    and `dtype` where given; None picks the best available for them (triton on CUDA, else reference)."""
    if name is None:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type == "cuda":
            fast = _load("triton")
            if (fast is not None and fast.available() and _supports(fast, dev, dtype)
                    and (fmt is None or fast.supports_format(get_format(fmt)))):
                return fast
        return check_support(_load("reference"), fmt, dev, dtype)
    valid = list_backends()
    if name not in _targets() and name not in _instances:
        raise UsageError(f"unknown backend {name!r}; expected one of: {', '.join(valid)}")
    backend = _load(name)
    if backend is None or not backend.available():
        raise UsageError(f"backend {name!r} is not available on this machine (its libraries or device are missing)")
    return check_support(backend, fmt, device, dtype, name=name)


def fake_quantize(x: torch.Tensor, fmt: str | Format, backend: str | None = None) -> torch.Tensor:
    """Quantize and dequantize `x` in `fmt`; same shape and dtype, blocks along the last dimension."""
    f = get_format(fmt)
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise UsageError(f"fake_quantize expects a float32, float16 or bfloat16 tensor, got {got}")
    return get_backend(backend, device=x.device, fmt=f, dtype=x.dtype).fake_quantize(x, f)


__all__ = ["Backend", "check_support", "fake_quantize", "get_backend", "list_backends", "register_backend",
           "ENTRY_POINT_GROUP"]
