"""Build pam_tokenlife.so (producer/pam) for the tests and benchmarks, with its Makefile."""

from __future__ import annotations

import subprocess
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[3] / "producer" / "pam"
#: what building needs besides make: the compiler and libpam's headers
HEADER = Path("/usr/include/security/pam_modules.h")


def build(out_dir: Path) -> Path:
    """Compile the module into ``out_dir`` (warnings are errors); returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["make", "-s", "-C", str(SOURCE), f"OUT={out_dir}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    module = out_dir / "pam_tokenlife.so"
    if proc.returncode != 0 or not module.is_file():
        raise RuntimeError(f"building pam_tokenlife.so failed: {proc.stdout}{proc.stderr}")
    module.chmod(0o644)
    return module
