"""The interface every kernel backend implements."""

from __future__ import annotations

import torch

from qgate.formats import Format


class Backend:
    """Fake-quantizes tensors into a Format; must match the reference backend bit for bit."""

    name: str = "?"

    def supports(self, device: torch.device | str, dtype: torch.dtype) -> bool:
        """Whether this backend can run on `device` with inputs of `dtype` (get_backend asks before using it)."""
        raise NotImplementedError

    def supports_format(self, fmt: Format) -> bool:
        """Whether this backend has a kernel for `fmt`; every format unless a backend says otherwise."""
        return True

    def available(self) -> bool:
        """Whether this backend can run on this machine at all (its libraries import, a device exists)."""
        return True

    def fake_quantize(self, x: torch.Tensor, fmt: Format) -> torch.Tensor:
        """Same shape and dtype as x; blocks along the last dimension."""
        raise NotImplementedError
