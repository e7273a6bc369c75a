"""Per-GPU tile shapes of the triton kernels: where a device's configs come from, and that no config of
the tuning space changes a bit of the output (every tile shape, run by Triton's interpreter on the CPU,
against the reference backend)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from qgate.backends import triton_tuning as tt

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QGATE_CACHE", str(tmp_path))
    monkeypatch.setattr(tt, "_resolved", {})
    return tmp_path / tt.CACHE_NAME


def test_defaults_then_the_built_in_table_then_a_cached_sweep(cache):
    assert tt.configs_for(None) == tt.DEFAULT  # the interpreter
    assert tt.configs_for("Some GPU") == tt.DEFAULT and tt.source_of("Some GPU") == "defaults"
    h200 = tt.configs_for("NVIDIA H200")
    assert h200["nvfp4"] == tt.KNOWN["NVIDIA H200"]["nvfp4"] != tt.DEFAULT["nvfp4"]
    assert h200["amax"] == tt.DEFAULT["amax"] and tt.source_of("NVIDIA H200") == "built-in table"

    chosen = {"nvfp4": {"R": 256, "num_warps": 2}, "fp8_row": {"ROWS": 2, "BLOCK_K": 2048, "num_warps": 8}}
    tt.save_sweep("NVIDIA H200", chosen, {"nvfp4": {"ms": 0.3}})
    tt.save_sweep("Other GPU", {"mx": {"R": 32, "num_warps": 8}}, {})
    h200 = tt.configs_for("NVIDIA H200")
    assert h200["nvfp4"] == chosen["nvfp4"] and h200["fp8_row"] == chosen["fp8_row"]
    assert h200["mx"] == tt.KNOWN["NVIDIA H200"]["mx"]  # not in the sweep: the built-in table's
    assert tt.configs_for("Other GPU")["mx"] == {"R": 32, "num_warps": 8}
    saved = json.loads(cache.read_text())
    assert set(saved) == {"NVIDIA H200", "Other GPU"} and saved["NVIDIA H200"]["measured"] == {"nvfp4": {"ms": 0.3}}
    assert "sweep cached" in tt.source_of("NVIDIA H200")


def test_a_cached_config_outside_the_space_is_ignored(cache):
    cache.write_text(json.dumps({"NVIDIA H200": {"configs": {"nvfp4": {"R": 96, "num_warps": 2},
                                                             "mx": {"R": 128, "num_warps": 8}}}}))
    got = tt.configs_for("NVIDIA H200")
    assert got["nvfp4"] == tt.KNOWN["NVIDIA H200"]["nvfp4"]  # R=96 is no tile a test covered
    assert got["mx"] == {"R": 128, "num_warps": 8}
    with pytest.raises(ValueError, match="outside the tuning space"):
        tt.save_sweep("NVIDIA H200", {"nvfp4": {"R": 96, "num_warps": 2}}, {})
    cache.write_text("not json")
    tt._resolved.clear()
    assert tt.configs_for("NVIDIA H200")["mx"] == tt.KNOWN["NVIDIA H200"]["mx"]  # unreadable cache: the table


def test_the_space_holds_the_defaults_and_the_built_in_table():
    for kernel, cfg in tt.DEFAULT.items():
        assert cfg in tt.SPACE[kernel], kernel
    for table in tt.KNOWN.values():
        for kernel, cfg in table.items():
            assert cfg in tt.SPACE[kernel], kernel


@pytest.mark.skipif(not HAS_TRITON or os.environ.get("TRITON_INTERPRET") == "1", reason="triton is not installed")
def test_every_tile_of_the_space_is_bit_exact_in_the_triton_interpreter():
    """Each tile shape of SPACE (warps do not exist in the interpreter) on tensors with tail blocks, a
    last program only partly filled, several column steps per row and several amax programs, NaN/Inf
    blocks and rows spanning 1e-30..1e20: the same bits as the reference."""
    script = textwrap.dedent("""
        import torch
        from qgate.backends.reference import ReferenceBackend
        from qgate.backends.triton import TritonBackend
        from qgate.backends.triton_tuning import SPACE
        from qgate.formats import get_format
        ref = ReferenceBackend()
        g = torch.Generator().manual_seed(1)
        wide = torch.randn(5, 2100, generator=g) * torch.logspace(-30, 20, 5).unsqueeze(1)
        wide[1, 7] = float("nan"); wide[2, 2099] = float("inf")
        mid = torch.randn(13, 673, generator=g) * torch.logspace(-3, 3, 13).unsqueeze(1)
        mid[3, 40] = float("inf")
        many = torch.randn(61, 673, generator=g)  # more values than the largest amax tile: several programs
        small = torch.randn(3, 7, 48, generator=g)
        # (tensor, dtype): the tile decides indexing and masks only, so one bf16 case suffices
        cases = [(wide, torch.float32), (mid, torch.float32), (mid, torch.bfloat16), (small, torch.float32)]
        amax_cases = [(wide, torch.float32), (many, torch.float32), (many, torch.bfloat16), (small, torch.float32)]
        formats = {"mx": "mxfp4", "mx_rceil": "mxfp4_rceil", "nvfp4": "nvfp4", "amax": "fp8", "fp8_row": "fp8_channel"}
        bad, runs = [], 0
        for kernel, space in SPACE.items():
            shapes = {tuple((k, v) for k, v in sorted(c.items()) if k != "num_warps"): c for c in space}
            for cfg in shapes.values():
                tri = TritonBackend(tiles={kernel: cfg})
                assert tri.tiles("cpu")[kernel] == cfg
                fmt = get_format(formats[kernel])
                for x, dtype in (amax_cases if kernel == "amax" else cases):
                    xx = x.to(dtype)
                    a, b = tri.fake_quantize(xx, fmt), ref.fake_quantize(xx, fmt)
                    runs += 1
                    if not torch.equal(torch.nan_to_num(a.float(), nan=7.0), torch.nan_to_num(b.float(), nan=7.0)):
                        bad.append((kernel, cfg, fmt.name, str(dtype), tuple(xx.shape)))
        print("RUNS", runs)
        print("MISMATCHES", bad)
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "MISMATCHES []" in res.stdout, res.stdout[-3000:]
    runs = int(res.stdout.split("RUNS")[1].split()[0])
    shapes = sum(len({tuple(sorted((k, v) for k, v in c.items() if k != "num_warps")) for c in space})
                 for space in tt.SPACE.values())
    assert runs == shapes * 4  # every tile shape ran on every case


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="without a GPU (a GPU would run the sweep)")
def test_bench_kernels_cli_passes_the_sweep_options_to_the_benchmark(monkeypatch):
    """`qgate bench kernels --sweep --rep-ms --budget-s` hands the options to bench/kernels.py's run(), which
    without a CUDA device stops with one line and exit code 2 (no traceback)."""
    import time

    from click.testing import CliRunner

    import qgate.cli as cli_module

    load = cli_module._bench_module
    seen = {}

    def load_and_watch(name):
        module = load(name)
        run = module.run

        def watched_run(*args, **kwargs):
            seen.update(kwargs, args=args)
            return run(*args, **kwargs)

        module.run = watched_run
        return module

    monkeypatch.setattr(cli_module, "_bench_module", load_and_watch)
    res = CliRunner().invoke(cli_module.cli, ["bench", "kernels", "--sweep", "--rep-ms", "50", "--budget-s", "30",
                                              "--size-mib", "1", "--no-peers"])
    assert seen["sweep"] is True and seen["rep_ms"] == 50 and seen["args"][0] == 1
    assert 0 < seen["deadline"] - time.monotonic() <= 30
    assert res.exit_code == 2
    assert "bench kernels needs a CUDA device" in res.output and "Traceback" not in res.output

    seen.clear()
    res = CliRunner().invoke(cli_module.cli, ["bench", "kernels"])
    assert res.exit_code == 2 and seen["sweep"] is False and seen["rep_ms"] == 200 and seen["deadline"] is None
    res = CliRunner().invoke(cli_module.cli, ["bench", "kernels", "--budget-s", "0"])
    assert res.exit_code == 2 and "--budget-s" in res.output


def test_kernel_isa_counts_the_common_path_of_a_sass_listing():
    """bench/kernel_isa.py's path count: forward conditional branches are taken (rare cases jumped over),
    counting stops at the first EXIT, NOP padding and the called slow paths after it are left out."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "kernel_isa.py"
    spec = importlib.util.spec_from_file_location("kernel_isa", path)
    isa = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(isa)
    sass = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/              @!P0 BRA 0x40 ;
        /*0020*/                   CALL.REL.NOINC 0x90 ;
        /*0030*/                   FMUL R2, R2, 1.5 ;
        /*0040*/                   FFMA R3, R2, R4, R5 ;
        /*0050*/               @P1 BRA 0x70 ;
        /*0060*/                   FMUL R3, R3, 1.20892581961462917471e+24 ;
        /*0070*/                   STG.E.128 desc[UR4][R6.64], R8 ;
        /*0080*/                   EXIT ;
        /*0090*/                   MUFU.RCP R0, R1 ;
        /*00a0*/                   RET.REL.NODEC R2 0x0 ;
        /*00b0*/                   NOP ;
    """
    assert isa.common_path(sass) == (6, [2, 1])
    assert isa.sass_instructions(sass)[-1] == "RET.REL.NODEC"
    ptx = ".visible .entry k(\n.param .u64 k_param_0\n)\n{\n.reg .b32 %r<4>;\n$L__BB0_1:\n\tmul.rn.f32 %r1, %r2, %r3;" \
          "\n\t// note\n\t@%p1 st.global.b32 [%rd1], %r1;\n\tret;\n}"
    assert isa.ptx_instructions(ptx) == ["mul.rn.f32 %r1, %r2, %r3;", "@%p1 st.global.b32 [%rd1], %r1;", "ret;"]
