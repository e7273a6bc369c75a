"""qgate.models: families, resolving members, loading (GGUF cache, directories, hub offline), tiny models."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from qgate import families, models  # noqa: E402
from qgate.errors import QgateError  # noqa: E402
from tiny import byte_tokenizer  # noqa: E402


@pytest.fixture
def tiny_dir(tmp_path):
    model = models.build_tiny_model("qwen2", seed=3)
    folder = tmp_path / "tiny-qwen2"
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder, model


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Tests that do not ask for the shared cache get their own, so they never see each other's files."""
    monkeypatch.setenv("QGATE_CACHE", str(tmp_path / "qgate-cache"))


# --- registry ---------------------------------------------------------------------------------


def test_families_and_members_in_order():
    assert families.list_families() == ["llama", "qwen2.5", "qwen2.5-coder", "smollm2"]  # the shipped policy files
    smol = families.get_family("smollm2")
    assert smol.default_member == "smollm2-135m-instruct"
    qwen = families.get_family("qwen2.5")
    assert [m.location for m in qwen.members] == [
        f"Qwen/Qwen2.5-{s}-Instruct" for s in ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B")
    ]
    # the hub id is accepted as an alias of the member name
    assert qwen.member("Qwen/Qwen2.5-7B-Instruct").name == "qwen2.5-7b-instruct"


def test_unknown_family_and_member_list_valid_names():
    with pytest.raises(QgateError, match=r"unknown model family 'gpt9'.*qwen2\.5, qwen2\.5-coder, smollm2"):
        families.get_family("gpt9")
    expected = r"unknown member 'qwen2.5-2b'.*qwen2\.5-0\.5b-instruct.*qwen2\.5-72b-instruct"
    with pytest.raises(QgateError, match=expected):
        models.resolve_member("qwen2.5", "qwen2.5-2b")


def test_resolve_sources():
    smol = models.resolve_member("smollm2")
    assert smol.source == "gguf" and Path(smol.location).is_file() and smol.location.endswith(".gguf")
    hub = models.resolve_member("qwen2.5", "qwen2.5-1.5b-instruct", revision="abc123")
    assert (hub.source, hub.location, hub.revision) == ("hub", "Qwen/Qwen2.5-1.5B-Instruct", "abc123")


def test_model_path_overrides(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    assert models.resolve_member("qwen2.5", model_path=tmp_path).source == "dir"
    spec = models.resolve_member("qwen2.5", "qwen2.5-7b-instruct", model_path=gguf)
    assert (spec.member, spec.source, spec.location) == ("qwen2.5-7b-instruct", "gguf", str(gguf.resolve()))
    with pytest.raises(QgateError, match="does not exist"):
        models.resolve_member("qwen2.5", model_path=tmp_path / "missing")
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(QgateError, match="not a .gguf file"):
        models.resolve_member("qwen2.5", model_path=other)


# --- hashes -----------------------------------------------------------------------------------


def test_file_hash_is_sha256_and_cached_by_size_and_mtime(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc" * 1000)
    expected = hashlib.sha256(b"abc" * 1000).hexdigest()
    assert models.file_sha256(f) == expected
    index = Path(os.environ["QGATE_CACHE"]) / "file-hashes.json"
    assert expected in index.read_text()
    # same size, new mtime: recomputed, not served stale from the index
    f.write_bytes(b"abd" * 1000)
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert models.file_sha256(f) == hashlib.sha256(b"abd" * 1000).hexdigest()


# --- loading directories, errors --------------------------------------------------------------


def test_load_directory_roundtrip(tiny_dir):
    folder, original = tiny_dir
    loaded = models.load_member(models.resolve_member("qwen2.5", model_path=folder), device="cpu")
    assert loaded.device.type == "cpu" and loaded.dtype == torch.float32
    assert not loaded.model.training
    assert loaded.checkpoint_hash.startswith("sha256:") and len(loaded.checkpoint_hash) == 71
    assert loaded.config_dict["model_type"] == "qwen2"
    ids = torch.tensor([[5, 17, 99, 3, 250]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, original(ids).logits)
    expected_ids = byte_tokenizer()("Hi there").input_ids
    assert len(expected_ids) == 8 and loaded.tokenizer("Hi there").input_ids == expected_ids
    assert models.checkpoint_hash(loaded.spec) == loaded.checkpoint_hash  # known without loading
    # the hash follows the content: same bytes, same hash; changed weights, new hash
    again = models.load_member(models.resolve_member("qwen2.5", model_path=folder), device="cpu")
    assert again.checkpoint_hash == loaded.checkpoint_hash
    changed = models.build_tiny_model("qwen2", seed=4)
    changed.save_pretrained(folder)
    third = models.load_member(models.resolve_member("qwen2.5", model_path=folder), device="cpu")
    assert third.checkpoint_hash != loaded.checkpoint_hash


def test_corrupt_directory_checkpoint_is_a_clear_error(tiny_dir):
    folder, _ = tiny_dir
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 1000])
    # found by reading the header, before transformers is asked to load anything
    with pytest.raises(QgateError, match=r"tiny-qwen2/model\.safetensors: not a readable safetensors file"):
        models.load_member(models.resolve_member("qwen2.5", model_path=folder), device="cpu")


def test_directory_without_config(tmp_path):
    with pytest.raises(QgateError, match="has no config.json"):
        models.load_member(models.resolve_member("qwen2.5", model_path=tmp_path), device="cpu")


@pytest.mark.parametrize("content", [b"not a gguf file at all" * 100, b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64])
def test_corrupt_gguf_is_a_clear_error_and_leaves_no_cache(tmp_path, content):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(content)
    with pytest.raises(QgateError, match=r"broken\.gguf: (not a GGUF file|truncated GGUF file|malformed GGUF)"):
        models.load_member(models.resolve_member("smollm2", model_path=bad), device="cpu", progress=False)
    cache_models = Path(os.environ["QGATE_CACHE"]) / "models"
    assert not cache_models.exists() or not any(cache_models.iterdir())


def test_hub_checkpoint_offline_names_it_and_how_to_provide_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    spec = models.resolve_member("qwen2.5", "qwen2.5-72b-instruct")
    with pytest.raises(QgateError) as info:
        models.load_member(spec, device="cpu")
    message = str(info.value)
    assert "Qwen/Qwen2.5-72B-Instruct" in message and "--model" in message and "hf download" in message


def test_unknown_dtype():
    with pytest.raises(QgateError, match="unknown dtype 'int3'"):
        models.resolve_dtype("int3", torch.device("cpu"))
    assert models.resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert models.resolve_dtype(None, torch.device("cuda")) == torch.bfloat16


# --- tiny models ------------------------------------------------------------------------------


def test_tiny_qwen2_has_qkv_biases_and_untied_embeddings():
    m = models.build_tiny_model("qwen2", seed=0)
    attn = m.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.v_proj.bias is not None
    assert attn.o_proj.bias is None
    assert m.lm_head.weight is not m.model.embed_tokens.weight
    linears = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    assert all(lin.in_features % 32 == 0 for lin in linears)


def test_tiny_llama_ties_embeddings_and_is_reproducible():
    a = models.build_tiny_model("llama", seed=7)
    b = models.build_tiny_model("llama", seed=7)
    c = models.build_tiny_model("llama", seed=8)
    assert a.lm_head.weight is a.model.embed_tokens.weight
    assert torch.equal(a.model.layers[1].mlp.down_proj.weight, b.model.layers[1].mlp.down_proj.weight)
    assert not torch.equal(a.model.layers[1].mlp.down_proj.weight, c.model.layers[1].mlp.down_proj.weight)
    with pytest.raises(QgateError, match="unknown tiny architecture"):
        models.build_tiny_model("gpt2")


# --- the real embedded model ------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_gguf_cache_matches_the_gguf_and_reloads_fast(monkeypatch):
    monkeypatch.delenv("QGATE_CACHE")  # the shared cache: converting once serves every test run
    spec = models.resolve_member("smollm2")
    first = models.load_member(spec, device="cpu", progress=False)  # converts if needed
    start = time.perf_counter()
    cached = models.load_member(spec, device="cpu", progress=False)
    reload_seconds = time.perf_counter() - start
    assert reload_seconds < 3.0  # ~0.4 s on an idle 2-core CPU; the GGUF path takes ~15 s
    sha = hashlib.sha256(Path(spec.location).read_bytes()).hexdigest()
    assert cached.checkpoint_hash == first.checkpoint_hash == f"sha256:{sha}"
    assert cached.dtype == torch.float32 and cached.device.type == "cpu"
    assert cached.model.lm_head.weight is cached.model.model.embed_tokens.weight  # tied, as in the GGUF
    assert cached.config_dict["num_hidden_layers"] == 30 and "quantization_config" not in cached.config_dict

    gguf_model, gguf_tok = models.load_gguf_uncached(spec.location)
    text = "The quick brown fox jumps over the lazy dog. Startups are about growth."
    ids = gguf_tok(text, return_tensors="pt").input_ids
    assert cached.tokenizer(text, return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        assert torch.equal(gguf_model(ids).logits, cached.model(ids).logits)


def test_gguf_conversions_are_cached_per_transformers_release(monkeypatch, tmp_path):
    """A conversion saved by one transformers release loaded as a broken model under another (SmolLM2
    converted by 5.0 and read by 5.24: loss 12.4 instead of 3.0), so each release keeps its own."""
    from importlib import metadata

    monkeypatch.setenv("QGATE_CACHE", str(tmp_path))
    folder = models.gguf_cache_dir("ab" * 32)
    assert folder == tmp_path / "models" / f"gguf-{'ab' * 32}-transformers-{metadata.version('transformers')}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_default_device_is_cuda_with_bf16(tiny_dir):
    folder, original = tiny_dir
    loaded = models.load_member(models.resolve_member("qwen2.5", model_path=folder))
    assert loaded.device.type == "cuda" and loaded.dtype == torch.bfloat16
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    weights = loaded.model.model.layers[1].mlp.down_proj.weight
    assert weights.is_cuda and torch.equal(weights.cpu(), original.model.layers[1].mlp.down_proj.weight.bfloat16())
    ids = torch.tensor([[5, 17, 99, 3, 250]])
    with torch.no_grad():
        logits = loaded.model(ids.cuda()).logits.float().cpu()
        assert torch.allclose(logits, original(ids).logits, atol=0.05)  # bf16 compute vs the float32 model
