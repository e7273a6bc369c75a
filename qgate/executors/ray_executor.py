"""The Ray executor: each planned unit is a Ray task asking for the GPUs its member needs.

Ray schedules the tasks over the cluster's GPUs and retries a task whose worker process died
(``max_retries``: a killed worker, a lost node); an exception raised by the unit itself (bad input,
a broken checkpoint) is not retried and reaches the driver as that exception. A retried unit skips
what its earlier attempt stored, and the store ignores a key written twice, so a retry never
duplicates an evaluation. Nothing comes back through Ray but a small summary: results go to the store.
"""

from __future__ import annotations

from typing import Callable, Sequence

from qgate.errors import QgateError
from qgate.executors.units import Unit, UnitResult, run_unit

MAX_RETRIES = 3  # attempts after a worker dies mid-unit


def qgate_unit(unit: Unit) -> UnitResult:
    """The Ray task (its worker's process title reads ``ray::qgate_unit`` while it runs)."""
    from qgate.progress import hidden_library_bars

    with hidden_library_bars():  # a worker's output is a log (Ray forwards it to the driver): no bar redraws
        return run_unit(unit)


def _gpu_memory() -> int:
    import torch

    return torch.cuda.get_device_properties(0).total_memory


class RayExecutor:
    name = "ray"
    places_units = True  # each unit asks for the GPUs its member needs; a worker sees only those

    def __init__(self, address: str | None = None, max_retries: int = MAX_RETRIES):
        self.address = address
        self.max_retries = max_retries
        self._started_ray = False

    def start(self) -> None:
        """Connect to the cluster at ``address`` ($RAY_ADDRESS, else a local one-machine cluster); an
        already connected driver (ray.init done by the caller) is used as it is."""
        try:
            import ray
        except ImportError:
            raise QgateError("--executor ray: Ray is not installed (pip install 'qgate[ray]')") from None
        if ray.is_initialized():
            return
        try:
            ray.init(address=self.address, logging_level="WARNING", log_to_driver=True)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            where = self.address or "a new local cluster"
            raise QgateError(f"--ray-address {where}: cannot connect to Ray ({str(exc).splitlines()[0]})") from None
        self._started_ray = True

    def gpu_count(self) -> int:
        import ray

        return int(ray.cluster_resources().get("GPU", 0))

    def gpu_bytes(self) -> int | None:
        """One GPU's memory, asked of a worker (the driver may have no GPU at all)."""
        import ray

        if not self.gpu_count():
            return None
        return ray.get(ray.remote(num_gpus=1, num_cpus=0)(_gpu_memory).remote())

    def nodes(self) -> int:
        import ray

        return sum(1 for n in ray.nodes() if n.get("Alive"))

    def run(self, units: Sequence[Unit], on_done: Callable[[UnitResult], None]) -> list[UnitResult]:
        """Submit every unit (in plan order: Ray starts them in that order as resources free up) and hand
        each result to ``on_done`` as it finishes (its notes come back in the result)."""
        import ray

        task = ray.remote(qgate_unit)
        pending = [task.options(num_gpus=u.gpus, num_cpus=1, max_retries=self.max_retries,
                                retry_exceptions=False).remote(u) for u in units]
        label = {ref: u.label for ref, u in zip(pending, units)}
        results = []
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                try:
                    results.append(ray.get(done[0]))
                except ray.exceptions.RayTaskError as exc:  # the unit raised: its own error, not Ray's wrapper
                    if isinstance(exc.cause, QgateError):
                        raise QgateError(str(exc.cause)) from None
                    raise RuntimeError(f"{label[done[0]]}: {type(exc.cause).__name__}: {exc.cause}") from exc
                except ray.exceptions.WorkerCrashedError:
                    raise RuntimeError(f"{label[done[0]]}: its worker died {1 + self.max_retries} times; "
                                       "what the attempts stored is kept for the next run") from None
                on_done(results[-1])
        except BaseException:
            for ref in pending:  # the run stops: free the cluster (what finished is stored)
                ray.cancel(ref, force=True)
            raise
        return results

    def close(self) -> None:
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False
