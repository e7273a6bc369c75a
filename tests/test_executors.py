"""How many GPUs a unit asks for: a member's bf16 footprint, read from its config (no weights)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from qgate.errors import QgateError
from qgate.executors import get_executor, gpus_for, member_gpus
from qgate.models import MemberSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from ray_scaling import QWEN25_72B  # noqa: E402

H200 = 143_771 * 2**20  # one H200 as torch reports it (143,771 MiB)
H100 = 81_559 * 2**20  # one H100 SXM 80 GB


def member(tmp_path: Path, config: dict, name: str) -> MemberSpec:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(config, model_type="qwen2")))
    return MemberSpec("qwen2.5", name, "dir", str(folder))


def test_gpus_follow_the_bf16_footprint(tmp_path):
    assert gpus_for(15e9, H200) == 1 and gpus_for(145e9, H200) == 2 and gpus_for(145e9, H100) == 2
    assert gpus_for(145e9, None) == 1  # unknown GPU size: one, as a local run would use
    big = member(tmp_path, QWEN25_72B, "q72")
    assert member_gpus(big, H200, available=2) == 2  # 145 GB of bf16 weights span two H200s
    with pytest.raises(QgateError, match=r"member q72: its bf16 weights \(135 GiB\) need 2 GPUs .* the cluster has 1"):
        member_gpus(big, H200, available=1)


def test_unknown_executor_is_bad_input():
    with pytest.raises(QgateError, match=r"--executor 'dask': expected one of local, ray"):
        get_executor("dask")
