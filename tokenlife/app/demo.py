"""``tokenlife demo``: the whole lifecycle on this machine, narrated, in real time.

Everything runs with the embedded defaults (SQLite store, the local delivery
transport, a static job source) in one temporary directory, with a freshly
generated key, the current user and lifetimes of seconds: mint, store, renew
up to renew-until, deliver to two "nodes" (directories under the temp dir),
``tokenlife-engine env`` as a job would run it, expiry, then a second login
and its revocation.  It needs no Slurm, no root and no network, takes about
20 seconds, never prints a token (only its first characters), and removes the
temp dir at the end (``--keep`` leaves it, with the store, for inspection).

The demo checks what it narrates: if a step does not have the outcome it
announces, it stops with a one-line error and a non-zero exit status.

Why one module of ~400 lines: it is a script read top to bottom, each step
narrated next to the check of its outcome; split, it would read worse.
"""

from __future__ import annotations

import collections
import json
import os
import pwd
import re
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tokenlife import config as configmod
from tokenlife.config import ProducerConfig
from tokenlife.errors import TokenlifeError
from tokenlife.fsutil import write_secret
from tokenlife.layout import FILE_NAME
from tokenlife.users import name_of

#: the demo's token limits (production defaults: 2d, 7d, 1h): renewals at
#: +3, +6, +9, +12 and +15 s, the last one capped at renew-until (+20 s)
LIFETIME, RENEW_UNTIL, RENEW_BEFORE = 6, 20, 3
POLL = 0.5  # seconds between renewer ticks (tokenlife serve: serve.interval)
NODES = ("node01", "node02")
REMOTE_DIR = "/run/tokenlife"  # delivery.remote_dir, as on a real node
MIN_RENEWALS = 3
SLACK = 10  # give up if the token has not expired this long after renew-until
SUBPROCESS_TIMEOUT = 30
_JWT = re.compile(r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")


class DemoError(TokenlifeError):
    """A step of the demo did not have the outcome it announced."""


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _hms(epoch: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(epoch))


def mask(text: str) -> str:
    """``text`` with every JSON Web Token cut to its first 12 characters."""
    return _JWT.sub(lambda m: m.group(0)[:12] + "…", text)


def _toml(value: object) -> str:
    """A TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(str(value))


def _owner(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _tool(script: str, module: str) -> list[str]:
    """The installed console script next to this interpreter, else ``python -m``."""
    path = Path(sys.executable).parent / script
    if path.is_file() and os.access(path, os.X_OK):
        return [str(path)]
    return [sys.executable, "-m", module]


class Demo:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.started = time.monotonic()
        self.uid = os.getuid()
        self.user = name_of(self.uid)
        self.store: Any = None
        self.site: Any = None

    # -- the steps ---------------------------------------------------------

    def run(self) -> None:
        work = self.work
        _say(
            f"tokenlife demo in {work} (mode {stat.S_IMODE(work.stat().st_mode):04o}): "
            "the whole token lifecycle, in real time, everything in this directory"
        )
        _say("1. setup")
        self.setup()
        _say("2. mint")
        first = self.mint("login: the producer minted")
        _say("3. delivery")
        self.deliver_first(first)
        _say("4. a job step on the node")
        self.engine_exports(first)
        _say("5. renewals, each delivered")
        final, renewals = self.renew_until_expiry(first)
        _say("6. expiry at renew-until")
        self.after_expiry(final, renewals)
        _say("7. revocation")
        self.revocation()
        _say("8. summary")
        self.summary()

    def setup(self) -> None:
        from repository.policy import Policy
        from tokenlife.app.site import Site

        work = self.work
        _say(f"user {self.user} (uid {self.uid})")
        key_path = work / "jwt_hs256.key"
        write_secret(key_path, secrets.token_bytes(32), mode=0o600)
        mode = stat.S_IMODE(key_path.stat().st_mode)
        _say(f"signing key {key_path}: 32 random bytes, mode {mode:04o} (Slurm's jwt_hs256.key)")
        self.config_path = work / "tokenlife.toml"
        self.config_path.write_text(self.config_text())
        config = self.config = configmod.load(self.config_path)
        margin = Policy.from_config(config.token).margin(config.token.lifetime)
        t = config.token
        _say(
            f"config {self.config_path} loaded: lifetime {t.lifetime}s, renew-until "
            f"{t.renew_until}s, renew_before {t.renew_before}s (production: 2d, 7d, 1h)"
        )
        _say(f"renewal window: a token is renewed {margin}s before its exp, never past renew-until")
        _say(
            f"store {config.store.url}; delivery: local transport to {', '.join(NODES)} "
            f"(directories under {config.delivery.root}), static job source"
        )
        if self.privileged:
            _say(
                f"{self.user} is a privileged account: the demo config allows its token; "
                "never do this in production (such a token can act as any user over slurmrestd)"
            )
        self.site = site = Site.from_config(config, actor="demo renewer")
        self.store = site.store
        self.key = site.key_source.load()
        self.minter = site.minter
        self.renewer = site.renewer
        self.cycle = site.cycle(actor="demo transfer")

    @property
    def privileged(self) -> bool:
        return self.uid == 0 or self.user == ProducerConfig().slurm_user

    def config_text(self) -> str:
        w = self.work
        node01 = w / "nodes" / NODES[0] / REMOTE_DIR.lstrip("/")
        nodes = ", ".join(_toml(n) for n in NODES)
        return (
            f"# tokenlife demo: everything under {w}\n"
            f"[key]\npath = {_toml(w / 'jwt_hs256.key')}\n\n"
            f'[token]\nlifetime = "{LIFETIME}s"\nrenew_until = "{RENEW_UNTIL}s"\n'
            f'renew_before = "{RENEW_BEFORE}s"\n\n'
            f"[producer]\nallow_privileged_users = {str(self.privileged).lower()}\n"
            f"socket = {_toml(w / 'mint.sock')}\n\n"
            f"[store]\nurl = {_toml(f'sqlite:///{w}/tokenlife.db')}\n"
            f"spool_dir = {_toml(w / 'spool')}\n\n"
            f"[login]\ntoken_dir = {_toml(w / 'login')}\n\n"
            f'[delivery]\ntransport = "local"\nroot = {_toml(w / "nodes")}\n'
            f'remote_dir = {_toml(REMOTE_DIR)}\njobs = "static"\n\n'
            f"[delivery.static]\n{_toml(self.user)} = [{nodes}]\n\n"
            f"# read by tokenlife-engine on {NODES[0]}\n"
            f'[engine]\ntoken_dir = {_toml(node01)}\nexport_jwt = "steps"\n'
            'wrapper_dir = ""  # no Slurm here: no wrappers for its commands\n\n'
            f'[serve]\nmetrics = ""\n'
        )

    def mint(self, why: str) -> Any:
        record, _ = self.minter.mint(self.user, self.uid, actor="demo")
        _say(
            f"{why} token {record.token_id} v{record.version}, iat {_hms(record.iat)}, "
            f"exp {_hms(record.exp)} (+{record.exp - record.iat}s), "
            f"renew-until {_hms(record.renew_until)}"
        )
        header, claims = self.verified(record.token)
        _say(
            f"  header {json.dumps(header, separators=(',', ':'))}; claims sun={claims['sun']} "
            f"uid={claims['uid']} gid={claims['gid']} iat={claims['iat']} exp={claims['exp']}; "
            "signature verified with the key (the token itself is never shown)"
        )
        login = self.config.login.token_dir / str(self.uid) / FILE_NAME
        _say(f"  login-node copy {login}, mode {stat.S_IMODE(login.stat().st_mode):04o}")
        return record

    def verified(self, token: str) -> tuple[dict[str, Any], dict[str, Any]]:
        from tokenlife import jwtlite

        header, _, _ = jwtlite.split(token)
        return header, self.key.verify(token)

    def node_file(self, node: str) -> Path:
        d = self.config.delivery
        assert d.root is not None
        return d.root / node / str(d.remote_dir).lstrip("/") / str(self.uid) / FILE_NAME

    def deliver(self, record: Any, first: bool = False) -> None:
        summary = self.cycle.run()
        if summary.failed or summary.jobs_error:
            raise DemoError(f"delivery failed: {(summary.errors or [summary.jobs_error])[0]}")
        _say(f"delivery cycle: {summary.line()}")
        versions = {d.node: d.version for d in self._deliveries()}
        for node in NODES:
            path = self.node_file(node)
            try:
                st = path.lstat()
                _, claims = self.verified(path.read_text())
            except (OSError, TokenlifeError) as exc:
                raise DemoError(f"{node}: no valid token file at {path}: {exc}") from exc
            if (claims["iat"], claims["exp"]) != (record.iat, record.exp):
                raise DemoError(f"{node}: {path} does not hold v{record.version}")
            if first:
                _say(
                    f"  {node}: {path}, mode {stat.S_IMODE(st.st_mode):04o}, owner "
                    f"{_owner(st.st_uid)}, {st.st_size} bytes, no trailing newline"
                )
            _say(
                f"  {node} holds {record.token_id} v{versions.get(node, '?')}: file iat "
                f"{_hms(claims['iat'])}, exp {_hms(claims['exp'])}, mtime = iat "
                f"({'yes' if int(st.st_mtime) == claims['iat'] else 'no'})"
            )

    def _deliveries(self) -> list[Any]:
        return list(self.store.deliveries.deliveries(self.user))

    def deliver_first(self, record: Any) -> None:
        _say(f"the static job source says {self.user} has work on {' and '.join(NODES)}")
        self.deliver(record, first=True)

    def engine_env(self) -> list[str]:
        env = {"TOKENLIFE_CONFIG": str(self.config_path), "SLURM_STEP_ID": "0"}
        _say(
            f"on {NODES[0]}, a job step's TaskProlog runs: "
            "TOKENLIFE_CONFIG=<demo config> SLURM_STEP_ID=0 tokenlife-engine env"
        )
        lines = self.command([*_tool("tokenlife-engine", "client_engine.cli"), "env"], env)
        for line in lines:
            _say(f"  | {mask(line)}")
        return lines

    def engine_exports(self, record: Any) -> None:
        lines = self.engine_env()
        exported = [x.split("=", 1)[1] for x in lines if x.startswith("export SLURM_JWT=")]
        if exported != [record.token]:
            raise DemoError("tokenlife-engine env did not export the delivered token")
        _say("  the job step gets SLURM_JWT: the delivered token, checked by the engine")

    def renew_until_expiry(self, record: Any) -> tuple[Any, int]:
        from repository.policy import Policy

        margin = Policy.from_config(self.config.token).margin(record.lifetime)
        _say(
            f"the renewer ticks every {POLL}s (tokenlife serve: every serve.interval); "
            f"first renewal due {_hms(record.exp - margin)}"
        )
        renewals = 0
        current = record
        deadline = record.renew_until + SLACK
        while True:
            summary = self.renewer.tick()
            if summary.failed:
                raise DemoError(f"renewal failed: {summary.errors[0]}")
            if summary.renewed:
                renewals += 1
                fresh = self.store.current(self.user)
                if fresh is None or fresh.token_id != record.token_id:
                    raise DemoError("the renewed token is not in the store")
                current = fresh
                if current.exp >= current.renew_until:
                    after = (
                        f"capped at renew-until (iat + lifetime would be "
                        f"{_hms(current.iat + current.lifetime)}): no more renewals"
                    )
                else:
                    after = f"next renewal due {_hms(current.exp - margin)}"
                _say(
                    f"renewed {current.token_id} to v{current.version}: iat "
                    f"{_hms(current.iat)}, exp {_hms(current.exp)}; {after}"
                )
                self.deliver(current)
            if summary.expired:
                return current, renewals
            if time.time() > deadline:
                raise DemoError(f"the token did not expire by {_hms(deadline)}")
            time.sleep(POLL)

    def after_expiry(self, last: Any, renewals: int) -> None:
        (record,) = [r for r in self.store.records(self.user) if r.token_id == last.token_id]
        _say(
            f"renew-until {_hms(record.renew_until)} passed: the renewer marked "
            f"{record.token_id} {record.state} (v{record.version}, {renewals} renewals)"
        )
        if record.state != "expired" or record.exp != record.renew_until:
            raise DemoError(f"expected an expired token with exp = renew-until, got {record}")
        if renewals < MIN_RENEWALS:
            raise DemoError(f"only {renewals} renewals happened (want {MIN_RENEWALS})")
        # The engine compares with a float clock: make sure exp is really behind.
        time.sleep(max(0.0, record.exp + 0.2 - time.time()))
        lines = self.engine_env()
        if any(x.startswith("export SLURM_JWT=") for x in lines):
            raise DemoError("tokenlife-engine env still exported the expired token")
        _say("  the engine refuses the expired file: the job step gets no SLURM_JWT")
        self.removal("the user has no valid token any more")

    def removal(self, why: str) -> None:
        summary = self.cycle.run()
        if summary.failed:
            raise DemoError(f"delivery failed: {summary.errors[0]}")
        _say(f"delivery cycle: {summary.line()} ({why}: nothing may stay on the nodes)")
        for node in NODES:
            path = self.node_file(node)
            if path.exists():
                raise DemoError(f"{node}: {path} is still there")
            _say(f"  {node}: {path} is gone")

    def revocation(self) -> None:
        record = self.mint("a new login: the producer minted")
        self.deliver(record)
        reason = "demo: laptop stolen"
        argv = ["-c", str(self.config_path), "revoke", self.user, "--reason", reason]
        _say(f"the admin revokes it: tokenlife -c <demo config> revoke {self.user} --reason ...")
        for line in self.command(_tool("tokenlife", "tokenlife.cli") + argv):
            _say(f"  | {mask(line)}")
        (stored,) = [r for r in self.store.records(self.user) if r.token_id == record.token_id]
        if stored.state != "revoked":
            raise DemoError(f"token {record.token_id} is {stored.state} after revoke")
        statuses = sorted({d.status for d in self._deliveries()})
        _say(f"  store: {stored.token_id} is {stored.state}; deliveries now {', '.join(statuses)}")
        if self.renewer.tick(force=True).renewed:
            raise DemoError("the renewer renewed a revoked token")
        _say("  a forced renewer tick renews nothing: a revoked token is never renewed")
        self.removal("the token was revoked")
        lines = self.engine_env()
        if any(x.startswith("export SLURM_JWT=") for x in lines):
            raise DemoError("tokenlife-engine env exported a revoked token")
        _say("the store as tokenlife list shows it:")
        for line in self.command(_tool("tokenlife", "tokenlife.cli") + argv[:2] + ["list"]):
            _say(f"  | {mask(line)}")

    def summary(self) -> None:
        counts = collections.Counter(str(e["event"]) for e in self.store.events())
        kinds = ("minted", "renewed", "delivered", "removed", "expired", "revoked")
        _say("audit trail: " + ", ".join(f"{counts[k]} {k}" for k in kinds))
        _say(f"done in {time.monotonic() - self.started:.1f}s")

    # -- helpers -----------------------------------------------------------

    def command(self, argv: list[str], env: dict[str, str] | None = None) -> list[str]:
        """Run a real command (in the work dir); its stdout lines, DemoError if it fails."""
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TOKENLIFE_"))}
        try:
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                env={**clean, **(env or {})},
                cwd=self.work,
                timeout=SUBPROCESS_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DemoError(f"{Path(argv[0]).name}: {exc}") from exc
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise DemoError(f"{Path(argv[0]).name} failed (exit {proc.returncode}): {mask(last)}")
        return proc.stdout.splitlines()

    def close(self) -> None:
        if self.site is not None:
            self.site.close()
        engine = getattr(self.store, "engine", None)
        if engine is not None:
            engine.dispose()


def run_demo(keep: bool = False) -> int:
    work = Path(tempfile.mkdtemp(prefix="tokenlife-demo-"))
    demo: Demo | None = None
    try:
        demo = Demo(work)
        demo.run()
        return 0
    except OSError as exc:
        raise DemoError(f"demo failed: {exc}") from exc
    finally:
        if demo is not None:
            demo.close()
        if keep:
            _say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
            _say(f"removed {work}")
