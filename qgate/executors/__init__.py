"""Executors run planned units (qgate.executors.units) and nothing else: ``local`` in this process,
``ray`` as Ray tasks on a cluster. The store is their only output; the gate decides afterwards."""

from __future__ import annotations

import math

from qgate.errors import QgateError

EXECUTORS = ("local", "ray")
GPU_HEADROOM = 1.15  # bf16 weights plus activations, the KV cache and the quantizer's per-tensor scratch


def gpus_for(bf16_bytes: float, gpu_bytes: float | None) -> int:
    """GPUs a member needs: its bf16 weights (with headroom) spread over GPUs of ``gpu_bytes`` each."""
    if not gpu_bytes:
        return 1
    return max(1, math.ceil(bf16_bytes * GPU_HEADROOM / gpu_bytes))


def get_executor(name: str | None, address: str | None = None):
    """The executor called ``name`` (default: local)."""
    name = name or "local"
    if name == "local":
        if address:
            raise QgateError(f"--ray-address {address}: only meaningful with --executor ray")
        from qgate.executors.local import LocalExecutor

        return LocalExecutor()
    if name == "ray":
        from qgate.executors.ray_executor import RayExecutor

        return RayExecutor(address)
    raise QgateError(f"--executor {name!r}: expected one of {', '.join(EXECUTORS)}")


def member_gpus(spec, gpu_bytes: float | None, available: int) -> int:
    """GPUs a resolved member asks for, from its bf16 footprint (read from its config, no weights)."""
    from qgate.footprint import footprint, load_config

    try:
        config = load_config(spec.location, revision=spec.revision)
    except QgateError:  # no readable config (e.g. a hub id not cached): one GPU, as a local run would use
        return 1
    bf16 = footprint(config, "bf16").bf16_bytes
    need = gpus_for(bf16, gpu_bytes)
    if need > available:
        raise QgateError(f"member {spec.member}: its bf16 weights ({bf16 / 2**30:.0f} GiB) need {need} GPUs of "
                         f"{(gpu_bytes or 0) / 2**30:.0f} GiB; the cluster has {available}")
    return need
