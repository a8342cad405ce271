"""R4: the bad-input corpus (tests/data/bad_inputs.toml), every case through the real CLI.

Each case must end with exactly one line on stderr, the documented exit
status (docs/commands.md, tokenlife.errors.EXIT_STATUS), no traceback, and
no write: the site directory is the same before and after, and no store is
created.  The commands run in this process (tokenlife.app.cli.main and
client_engine.cli.main, as the console scripts call them): 300 subprocesses
would cost a minute of interpreter start-up for nothing.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client_engine import cli as engine_cli
from tests.conftest import REPO, require_root, write_cli_site
from tokenlife.app import cli

CORPUS = tomllib.loads((REPO / "tests" / "data" / "bad_inputs.toml").read_text())
KEY = secrets.token_bytes(32)


def cases() -> Iterator[Any]:
    for group in CORPUS["config"]:
        for value in group["values"]:
            yield pytest.param("config", (group["key"], value), id=f"config-{group['key']}={value}")
    for i, text in enumerate(CORPUS["config_file"][0]["texts"]):
        yield pytest.param("config_file", text, id=f"config_file-{i}")
    for value in CORPUS["duration"][0]["values"]:
        yield pytest.param("duration", value, id=f"duration-{value!r}")
    for value in CORPUS["user"][0]["values"]:
        yield pytest.param("user", value, id=f"user-{value!r}")
    for i, case in enumerate(CORPUS["key_file"][0]["cases"]):
        yield pytest.param("key_file", case, id=f"key_file-{i}")
    for i, value in enumerate(CORPUS["token"][0]["values"]):
        yield pytest.param("token", value, id=f"token-{i}")
    for i, output in enumerate(CORPUS["squeue"][0]["outputs"]):
        yield pytest.param("squeue", output, id=f"squeue-{i}")
    for i, case in enumerate(CORPUS["engine_env"][0]["cases"]):
        yield pytest.param("engine_env", case, id=f"engine_env-{i}")


def test_the_corpus_is_big_enough() -> None:
    assert len(list(cases())) >= 300


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    return {
        str(p.relative_to(root)): (p.lstat().st_mode, p.lstat().st_size, p.lstat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def run(main: Any, argv: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(("kind", "case"), list(cases()))
def test_bad_input(tmp_path: Path, kind: str, case: Any) -> None:
    site = tmp_path / "site"
    site.mkdir()
    cfg = write_cli_site(site, KEY)
    base = cfg.read_text()
    env = {"PATH": os.environ["PATH"], "TOKENLIFE_CONFIG": str(cfg), "HOME": str(tmp_path)}
    main: Any = cli.main
    argv: list[str]
    if kind == "config":
        key, value = case
        cfg.write_text(_merged(base, key, value))
        argv, status, prefix = ["config", "check"], 2, f"tokenlife-config: {cfg}: "
    elif kind == "config_file":
        cfg.write_text(base + case if case.startswith("[") and "token" in case else case)
        argv, status, prefix = ["config", "check"], 2, f"tokenlife-config: {cfg}: "
    elif kind == "duration":
        argv, status, prefix = ["mint", "--lifetime", case, "nobody"], 2, "tokenlife-mint: "
    elif kind == "user":
        argv, status, prefix = ["mint", "--local", case], {2, 4}, "tokenlife-mint: "
    elif kind == "key_file":
        require_root()  # root mints for nobody
        key = site / "k"
        key.write_bytes(case["content"].encode())
        key.chmod(case["mode"])
        argv, status, prefix = ["mint", "--local", "nobody"], 3, "tokenlife-mint: "
    elif kind == "token":
        main = engine_cli.main
        env.update(SLURM_JWT=case, SLURM_JOB_UID=str(os.getuid()))
        cfg.write_text(f'[engine]\ntoken_dir = "{site}/run"\n')
        argv, status, prefix = ["token"], 1, "tokenlife-engine: "
    elif kind == "squeue":
        squeue = site / "bin" / "squeue"
        squeue.parent.mkdir()
        (site / "out.json").write_text(case)
        squeue.write_text(f"#!/bin/sh\ncat {site}/out.json\n")
        squeue.chmod(0o755)
        env["PATH"] = f"{squeue.parent}:{env['PATH']}"
        cfg.write_text(
            base + f'[delivery]\ntransport = "local"\nroot = "{site}/nodes"\njobs = "slurm"\n'
        )
        argv, status, prefix = ["push"], 1, "tokenlife-push: "
    else:  # engine_env
        main = engine_cli.main
        env.update({k: v for k, v in case.items()})
        env.setdefault("SLURM_JOB_UID", str(os.getuid()))
        cfg.write_text(f'[engine]\ntoken_dir = "{site}/run"\n')
        argv, status, prefix = ["token"], {1, 2}, "tokenlife-engine: "
    before = snapshot(site)
    code, out, err = run(main, argv, env)
    expected = status if isinstance(status, set) else {status}
    assert code in expected, (code, out, err)
    lines = err.splitlines()
    assert "Traceback" not in err and "unexpected error" not in err
    if kind == "squeue":  # the cycle's summary line on stdout, its one error on stderr
        assert lines == [lines[0]] and lines[0].startswith("tokenlife-push: squeue"), err
    elif kind in ("token", "engine_env"):
        assert len(lines) >= 1 and all(line.startswith(prefix) for line in lines), err
        assert out == ""
    else:
        assert len(lines) == 1 and lines[0].startswith(prefix), err
    after = snapshot(site)
    if kind == "squeue":  # push is a store operation: only the store may appear, empty
        after = {k: v for k, v in after.items() if not k.startswith("db")}
        assert not (site / "nodes").exists()
    else:
        assert not (site / "db").exists()
    assert after == before  # nothing written
    assert KEY.hex() not in out + err


def _merged(base: str, key: str, value: str) -> str:
    """The base config with ``key = value`` in its table (replacing a same-named table)."""
    table, _, name = key.rpartition(".")
    kept, skip = [], False
    for line in base.splitlines(keepends=True):
        if line.startswith("["):
            skip = line.strip() == f"[{table}]"
        if not skip:
            kept.append(line)
    carried = (
        [
            line
            for line in base.split(f"[{table}]\n", 1)[1].split("[", 1)[0].splitlines(keepends=True)
        ]
        if f"[{table}]\n" in base
        else []
    )
    carried = [line for line in carried if not line.startswith(f"{name} =")]
    return "".join(kept) + f"[{table}]\n" + "".join(carried) + f"{name} = {value}\n"


def test_merged_keeps_the_table_and_replaces_the_key() -> None:
    base = '[key]\npath = "/k"\n[store]\nurl = "x"\n'
    assert _merged(base, "key.path", '"rel"') == '[store]\nurl = "x"\n[key]\npath = "rel"\n'
    assert _merged(base, "key.kid", '"x"').endswith('[key]\npath = "/k"\nkid = "x"\n')
