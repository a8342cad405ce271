"""R5, the standing leak scan: the whole lifecycle at maximum verbosity, every output
searched for token and key material.

One site in a temp dir (SQLite store, local transport to two "nodes", static jobs, a
fresh HS256 key, then a second one), driven with the real ``tokenlife`` at
``-vv --debug``: config check, mint, list, status, renew, push, rotate-key, serve (with
its metrics endpoint scraped, ticked with SIGALRM, a mint over its socket, stopped
with SIGTERM), revoke, purge; and ``tokenlife-engine`` env/token/exec as the job's
user (nobody) on a node.

Collected: every stdout and stderr, the metrics text, every ``--json`` output, the
audit trail and every column of the store but ``token``, ``/proc/<pid>/cmdline`` and
``environ`` of the daemon and of a job's process, and every file left in the temp dir
but the token files, the keys and the store.  Searched for: every token the store ever
held (its ``token`` column read after every step, so every version), each one's
signature part and its first and last 20 characters, and each key in raw, hex and
base64 (standard and URL-safe, padded or not).

By design, and checked to be exactly that: ``mint --print`` and ``tokenlife-engine
token`` print the token and nothing else; ``tokenlife-engine env`` in a job step
prints ``export SLURM_JWT=<token>`` (the TaskProlog protocol); ``exec``'s command gets
``SLURM_JWT`` in its environment (so its ``env`` output and its ``/proc/<pid>/environ``
hold it, and nothing else of the kind), which another user cannot read.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest

from producer.keys import FileKeySource, HS256Key
from producer.mint import Minter
from repository.store import SqlTokenStore
from tests.conftest import require_root, require_tool, tokenlife_bin
from tokenlife import config as configmod
from tokenlife.errors import TokenInvalid
from tokenlife.testing.fakes import FakeClock

USER = "nobody"
NODES = ("node01", "node02")
#: a uid that is neither the job's user nor root, to try reading a job's environment
STRANGER_UID = 1


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def drop_to(uid: int, gid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Site:
    """The temp dir, its config, and everything collected while the lifecycle runs."""

    def __init__(self, work: Path, logs: Path) -> None:
        self.work, self.logs = work, logs
        self.keys = {"k1": work / "k1", "k2": work / "k2"}
        #: every key that was ever in a file here, the refused ones too
        self.key_bytes: dict[str, bytes] = {}
        for name, path in self.keys.items():
            self.new_key(name, path)
        self.db = work / "tokenlife.db"
        self.port = free_port()
        self.config = work / "tokenlife.toml"
        self.write_config("k1")
        self.uid = pwd.getpwnam(USER).pw_uid
        self.node_file = work / "nodes" / NODES[0] / "run/tokenlife" / str(self.uid) / "slurm_jwt"
        #: (label, bytes) of everything scanned
        self.sources: list[tuple[str, bytes]] = []
        #: every token issued (store, spool, token files), in the order first seen
        self.tokens: list[str] = []
        self.by_design: list[str] = []
        #: the by-design outputs themselves: the scan must find the token in each
        self.controls: list[tuple[str, bytes]] = []

    def new_key(self, name: str, path: Path, size: int = 32, mode: int = 0o600) -> Path:
        self.key_bytes[name] = secrets.token_bytes(size)
        path.write_bytes(self.key_bytes[name])
        path.chmod(mode)
        return path

    def write_config(self, key: str) -> None:
        w = self.work
        self.config.write_text(
            f'[key]\npath = "{self.keys[key]}"\n\n'
            '[token]\nlifetime = "1h"\nrenew_until = "1d"\nrenew_before = "5m"\n\n'
            f'[producer]\nsocket = "{w}/mint.sock"\n\n'
            f'[store]\nurl = "sqlite:///{self.db}"\nspool_dir = "{w}/spool"\n\n'
            f'[login]\ntoken_dir = "{w}/login"\n\n'
            f'[delivery]\ntransport = "local"\nroot = "{w}/nodes"\n'
            'remote_dir = "/run/tokenlife"\njobs = "static"\n\n'
            f"[delivery.static]\n{USER} = {json.dumps(list(NODES))}\n\n"
            f'[engine]\ntoken_dir = "{w}/nodes/{NODES[0]}/run/tokenlife"\n'
            'export_jwt = "steps"\nwrapper_dir = ""\n\n'
            f'[serve]\ninterval = "1h"\nmetrics = "127.0.0.1:{self.port}"\n'
        )
        self.config.chmod(0o644)  # the engine reads it as the job's user

    # -- collecting -----------------------------------------------------------------------

    def add(self, label: str, data: bytes | str) -> None:
        self.sources.append((label, data.encode() if isinstance(data, str) else data))

    def harvest(self) -> None:
        """Every token in the store now (each renewal overwrites the column: read it after
        every step), in the login path's spool (a record lives there until the next command
        ingests it, or ignores it) and in the token files."""
        found: list[str] = []
        if self.db.exists():
            with closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)) as db:
                found += [row[0] for row in db.execute("SELECT token FROM tokens ORDER BY id")]
        for record in sorted((self.work / "spool").glob("*.json*")):
            with contextlib.suppress(OSError, ValueError):  # ingested meanwhile
                found.append(json.loads(record.read_bytes())["token"])
        for path in sorted(self.work.rglob("slurm_jwt")):
            with contextlib.suppress(OSError):
                found.append(path.read_text().strip())
        self.tokens += [t for t in dict.fromkeys(found) if t and t not in self.tokens]

    def current(self) -> str:
        with closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)) as db:
            row = db.execute(
                "SELECT token FROM tokens WHERE user = ? AND state = 'active' ORDER BY id DESC",
                (USER,),
            ).fetchone()
        assert row is not None, "no active token in the store"
        return str(row[0])

    # -- running --------------------------------------------------------------------------

    def cli(
        self, *args: str, ok: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """``tokenlife -c CONFIG -vv --debug ARGS`` as tests.conftest.run_cli runs it, in bytes
        (a raw key in the output must be found, not stop the test with a UnicodeDecodeError);
        stdout and stderr are collected, the store is harvested."""
        full = {k: v for k, v in os.environ.items() if k != "TOKENLIFE_CONFIG"}
        argv = ["-c", str(self.config), "-vv", "--debug", *args]
        proc = subprocess.run(
            [tokenlife_bin(), *argv],
            capture_output=True,
            env={**full, **(env or {})},
            timeout=120,
            check=False,
        )
        label = " ".join([*(env or {}), "tokenlife", *args])
        if ok:
            assert proc.returncode == 0, (label, proc.stderr.decode(errors="replace")[-2000:])
        self.add(f"{label}: stderr", proc.stderr)
        self.harvest()
        return proc

    def cli_scanned(self, *args: str, env: dict[str, str] | None = None) -> bytes:
        proc = self.cli(*args, env=env)
        self.add(f"{' '.join([*(env or {}), 'tokenlife', *args])}: stdout", proc.stdout)
        return proc.stdout

    def engine(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """``tokenlife-engine ARGS`` as the job's user, started (not waited for)."""
        engine = str(Path(sys.executable).parent / "tokenlife-engine")
        pw = pwd.getpwnam(USER)
        drop = drop_to(pw.pw_uid, pw.pw_gid)
        base = {"PATH": os.environ["PATH"], "TOKENLIFE_CONFIG": str(self.config)}
        return subprocess.Popen(
            [*drop, engine, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**base, **(env or {})},
            cwd="/",
        )

    def engine_run(self, *args: str, env: dict[str, str] | None = None) -> tuple[bytes, bytes]:
        proc = self.engine(*args, env=env)
        out, err = proc.communicate(timeout=30)
        label = f"tokenlife-engine {' '.join(args)} {' '.join(env or {})}".rstrip()
        assert proc.returncode == 0, (label, err)
        self.add(f"{label}: stderr", err)
        return out, err

    # -- the by-design outputs, checked to hold the token and nothing else -----------------

    def exactly_the_token(self, label: str, stdout: bytes, token: str) -> None:
        assert stdout == f"{token}\n".encode(), f"{label} printed more or less than the token"
        assert token in self.tokens, f"{label} printed a token the store never held"
        self.by_design.append(label)
        self.controls.append((label, stdout))

    def environment_with_token(self, label: str, lines: list[bytes], token: str) -> None:
        """An environment (``env`` output or /proc environ): SLURM_JWT=<token>, the rest scanned."""
        expected = f"SLURM_JWT={token}".encode()
        assert lines.count(expected) == 1, f"{label}: no SLURM_JWT with the current token"
        self.by_design.append(f"{label}: SLURM_JWT")
        self.controls.append((label, expected))
        self.add(f"{label} (without SLURM_JWT)", b"\n".join(x for x in lines if x != expected))


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    require_root()
    require_tool("setpriv")
    # Not under tmp_path (0700 parents): the job's user must reach the node's files.
    work = Path(tempfile.mkdtemp(prefix="tl-leak-"))
    work.chmod(0o711)
    try:
        yield Site(work, tmp_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- the steps --------------------------------------------------------------------------------


LOGIN = {"PAM_USER": USER, "PAM_TYPE": "open_session"}


def pam(site: Site) -> None:
    """A login: ``tokenlife pam`` asks this site's mint service (never the default socket,
    which may be another install's), and mints into the spool when none answers."""
    site.cli_scanned("pam", "--socket", str(site.work / "mint.sock"), env=LOGIN)


def admin_commands(site: Site) -> None:
    site.cli_scanned("config", "check")
    site.cli_scanned("config", "check", "--json")
    pam(site)  # no mint service yet: minted here, into the spool
    site.cli_scanned("mint", "--local", USER)
    site.cli_scanned("mint", "--local", USER, "--json")
    printed = site.cli("mint", "--local", USER, "--print").stdout
    site.exactly_the_token("mint --local --print: stdout", printed, site.current())
    site.cli_scanned("list", "--json")
    site.cli_scanned("status", "--json")
    site.cli_scanned("renew", "--now")
    site.cli_scanned("renew", "--now", "--json")
    site.cli_scanned("push")
    site.cli_scanned("push", "--json")


def engine_commands(site: Site, stage: str) -> None:
    """The job's side, as nobody: the node holds the store's current token."""
    token = site.current()
    assert site.node_file.read_text() == token
    path = str(site.node_file)
    batch, _ = site.engine_run("env")
    assert batch.decode().splitlines() == [f"export SLURM_JWT_FILE={path}"]
    site.add(f"tokenlife-engine env (batch step, {stage}): stdout", batch)
    older = site.tokens[0]  # inherited from the submitter: dropped, never echoed
    inherited, _ = site.engine_run("env", env={"SLURM_JWT": older})
    assert inherited.decode().splitlines()[-1] == "unset SLURM_JWT"
    site.add(f"tokenlife-engine env with an inherited SLURM_JWT ({stage}): stdout", inherited)
    step, _ = site.engine_run("env", env={"SLURM_STEP_ID": "0"})
    assert step.decode().splitlines() == [
        f"export SLURM_JWT_FILE={path}",
        f"export SLURM_JWT={token}",
    ], "tokenlife-engine env (step) printed more than its two exports"
    site.by_design.append(f"tokenlife-engine env (job step, {stage}): stdout")
    site.controls.append((f"tokenlife-engine env (job step, {stage})", step))
    printed, _ = site.engine_run("token")
    site.exactly_the_token(f"tokenlife-engine token ({stage}): stdout", printed, token)
    child, _ = site.engine_run("exec", "--", "env")
    site.environment_with_token(
        f"tokenlife-engine exec -- env ({stage})", child.split(b"\n"), token
    )


def job_process(site: Site) -> None:
    """A job's command run by ``exec``: its argv is public, its environment is not."""
    proc = site.engine("exec", "--", "sleep", "60")
    try:
        proc_dir = Path(f"/proc/{proc.pid}")
        wait_for("exec to run sleep", lambda: (proc_dir / "cmdline").read_bytes()[:5] == b"sleep")
        site.add("/proc/<job>/cmdline", (proc_dir / "cmdline").read_bytes())
        environ = (proc_dir / "environ").read_bytes().split(b"\0")
        site.environment_with_token("/proc/<job>/environ", environ, site.current())
        stranger = subprocess.run(
            [*drop_to(STRANGER_UID, STRANGER_UID), "cat", str(proc_dir / "environ")],
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert stranger.returncode != 0 and stranger.stdout == b"", "another user read it"
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def refused_keys(site: Site) -> None:
    """A new key that is unsafe or too short is refused: the message names it, never shows it."""
    for name, size, mode, status in (("k-open", 32, 0o644, 3), ("k-short", 16, 0o600, 3)):
        path = site.new_key(name, site.work / name, size, mode)
        proc = site.cli("rotate-key", "--key", str(path), ok=False)
        assert proc.returncode == status, proc.stderr[-500:]
        site.add(f"tokenlife rotate-key --key {name} (refused): stdout", proc.stdout)
        path.unlink()  # its bytes stay needles


def rotate(site: Site) -> None:
    refused_keys(site)
    site.cli_scanned("rotate-key", "--key", str(site.keys["k2"]), "--json")
    site.write_config("k2")  # the new key is now the configured one
    site.cli_scanned("push")


def mint_in_the_past(site: Site) -> None:
    """A token minted 3500 s ago (in process), so that serve's first tick renews it."""
    config = configmod.load(site.config)
    store = SqlTokenStore(config.store.url)
    try:
        clock = FakeClock(start=time.time() - 3500)
        Minter(config, FileKeySource(config.key), store, clock).mint(USER, 0)
    finally:
        store.close()
    site.harvest()


def serve(site: Site) -> None:
    out, err = site.logs / "serve.out", site.logs / "serve.err"
    before = site.current()
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [tokenlife_bin(), "-c", str(site.config), "-vv", "--debug", "serve"],
            stdout=stdout,
            stderr=stderr,
        )
    try:
        url = f"http://127.0.0.1:{site.port}/metrics"
        wait_for("the first tick's delivery", lambda: b"delivery:" in err.read_bytes())
        assert site.current() != before, "serve's first tick did not renew the due token"
        site.harvest()
        proc.send_signal(signal.SIGALRM)
        wait_for("the SIGALRM tick", lambda: err.read_bytes().count(b"delivery:") >= 2)
        printed = site.cli("mint", USER, "--print").stdout  # over the daemon's socket
        site.exactly_the_token("mint --print (over the socket): stdout", printed, site.current())
        site.cli_scanned("mint", USER)
        pam(site)  # a login, over the socket
        with urllib.request.urlopen(url, timeout=10) as response:
            metrics = response.read()
        assert b"tokenlife_tokens" in metrics
        site.add("serve: /metrics", metrics)
        site.add("serve: /proc/<pid>/cmdline", Path(f"/proc/{proc.pid}/cmdline").read_bytes())
        site.add("serve: /proc/<pid>/environ", Path(f"/proc/{proc.pid}/environ").read_bytes())
        site.harvest()
    finally:
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=30)
    assert status == 0
    site.add("tokenlife serve: stdout", out.read_bytes())
    site.add("tokenlife serve: stderr", err.read_bytes())
    site.harvest()


def wind_down(site: Site) -> None:
    site.cli_scanned("revoke", USER, "--reason", "R5 leak scan")
    site.cli_scanned("push")
    site.cli_scanned("purge", "--dry-run")
    site.cli_scanned("purge", "--dry-run", "--json")
    site.cli_scanned("list", "--json")
    site.cli_scanned("list")
    site.cli_scanned("status", "--json")
    site.cli_scanned("status")


def audit_trail(site: Site) -> None:
    store = SqlTokenStore(f"sqlite:///{site.db}")
    try:
        site.add("store.events()", json.dumps(store.events(), indent=1))
    finally:
        store.close()
    with closing(sqlite3.connect(f"file:{site.db}?mode=ro", uri=True)) as db:
        for table in ("tokens", "events", "deliveries", "alembic_version"):
            cursor = db.execute(f"SELECT * FROM {table}")
            columns = [c[0] for c in cursor.description]
            rows = [
                {c: v for c, v in zip(columns, row, strict=True) if c != "token"}
                for row in cursor.fetchall()
            ]
            site.add(f"store table {table} (all but the token column)", json.dumps(rows))


def left_files(site: Site) -> list[str]:
    """Every file in the temp dir but the token files, the keys and the store (those
    are checked to be private instead)."""
    expected_names = {"slurm_jwt"}
    skipped = []
    store_files = {site.db.name + s for s in ("", "-wal", "-shm", "-journal")}
    for path in sorted(site.work.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        rel = path.relative_to(site.work)
        is_token_file = path.name in expected_names and path.parent.name == str(site.uid)
        if is_token_file or path in site.keys.values() or str(rel) in store_files:
            mode = path.stat().st_mode & 0o777
            assert mode & 0o077 == 0, f"{rel} has mode {mode:04o}: others can read it"
            skipped.append(str(rel))
            continue
        site.add(f"file {rel}", path.read_bytes())
    return skipped


def _verifies(key: HS256Key, token: str) -> bool:
    try:
        key.verify(token)
    except TokenInvalid:
        return False
    return True


# -- the scan ---------------------------------------------------------------------------------


def needles(site: Site) -> list[tuple[str, bytes]]:
    found: list[tuple[str, bytes]] = []
    for index, token in enumerate(site.tokens):
        signature = token.rsplit(".", 1)[1]
        found += [
            (f"token #{index}", token.encode()),
            (f"token #{index} signature", signature.encode()),
            (f"token #{index} signature head", signature[:20].encode()),
            (f"token #{index} signature tail", signature[-20:].encode()),
        ]
    for name, key in site.key_bytes.items():
        forms = {
            "raw": key,
            "hex": key.hex().encode(),
            "HEX": key.hex().upper().encode(),
            "base64": base64.b64encode(key),
            "base64url": base64.urlsafe_b64encode(key),
        }
        for form, value in list(forms.items()):
            if form.startswith("base64"):
                forms[f"{form} unpadded"] = value.rstrip(b"=")
        found += [(f"key {name} ({form})", value) for form, value in forms.items()]
    return found


def test_no_token_or_key_leaks_anywhere(site: Site) -> None:
    started = time.monotonic()
    admin_commands(site)
    engine_commands(site, "after push")
    job_process(site)
    rotate(site)
    mint_in_the_past(site)
    serve(site)
    site.cli_scanned("push")  # the mints over the socket came after serve's last delivery
    engine_commands(site, "after serve")
    wind_down(site)
    audit_trail(site)
    skipped = left_files(site)

    # The collection itself is sound: every version was seen, every step spoke.
    # (two mints or renewals in the same second make the same token: HS256 is deterministic)
    assert len(site.tokens) >= 5, f"only {len(site.tokens)} tokens collected"
    for name, path in site.keys.items():
        key = HS256Key(path.read_bytes())
        assert any(_verifies(key, token) for token in site.tokens), f"no token signed by {name}"
    assert len(site.sources) > 50 and all(label for label, _ in site.sources)
    stderr_total = sum(len(d) for label, d in site.sources if label.endswith("stderr"))
    assert stderr_total > 10_000, "-vv --debug logged almost nothing: is logging on?"

    search = needles(site)
    # The needles match what real outputs look like: each by-design output is found.
    token_needles = [needle for what, needle in search if what.startswith("token")]
    for label, data in site.controls:
        assert any(needle in data for needle in token_needles), f"scan misses {label}"
    leaks = [
        f"{what} in {label}"
        for label, data in site.sources
        for what, needle in search
        if needle in data
    ]
    scanned = sum(len(data) for _, data in site.sources)
    lines = sum(data.count(b"\n") + 1 for _, data in site.sources)
    print(
        f"\nR5 leak scan: {len(site.sources)} sources, {scanned} bytes, {lines} lines; "
        f"{len(site.tokens)} tokens and {len(site.key_bytes)} keys as {len(search)} needles; "
        f"by design: {len(site.by_design)} outputs; not scanned: {', '.join(skipped) or '-'}; "
        f"{time.monotonic() - started:.1f}s"
    )
    assert not leaks, "token or key material leaked:\n" + "\n".join(leaks)
