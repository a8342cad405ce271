"""The README's first command: `tokenlife demo` works and leaves nothing behind."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from tests.conftest import run_cli


def test_demo_runs_and_cleans_up() -> None:
    before = set(Path(tempfile.gettempdir()).glob("tokenlife-demo-*"))
    result = run_cli("demo")
    assert result.returncode == 0, result.stderr
    work = re.search(r"work directory (\S+);", result.stdout)
    assert work is not None
    assert not Path(work.group(1)).exists()
    assert set(Path(tempfile.gettempdir()).glob("tokenlife-demo-*")) == before
    assert "mode 0600" in result.stdout and "(new mint: False)" in result.stdout
