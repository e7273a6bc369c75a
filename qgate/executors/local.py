"""The local executor (the default): planned units run one after another in this process, on the
gate's own device, showing their progress on the gate's bar as they go."""

from __future__ import annotations

from typing import Callable, Sequence

from qgate.executors.units import Unit, UnitResult, run_unit


class LocalExecutor:
    name = "local"
    places_units = False  # units run on the gate's device; no GPUs are asked for

    def __init__(self, progress=None):
        self.progress = progress  # the gate's qgate.progress.Progress while it runs units here

    def start(self) -> None:
        pass

    def gpu_count(self) -> int:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0

    def gpu_bytes(self) -> int | None:
        import torch

        return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None

    def nodes(self) -> int:
        return 1

    def run(self, units: Sequence[Unit], on_done: Callable[[UnitResult], None]) -> list[UnitResult]:
        results = []
        for unit in units:
            results.append(run_unit(unit, self.progress))
            on_done(results[-1])
        return results

    def close(self) -> None:
        pass
