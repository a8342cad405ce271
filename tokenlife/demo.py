"""``tokenlife demo``: the lifecycle on this machine, narrated, in a temp dir.

Uses the embedded defaults (SQLite store, files on this host) with a freshly
generated key, so it needs no Slurm, no root and no network, and leaves
nothing behind outside its temporary directory.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import tempfile
import time
from pathlib import Path

from tokenlife import config as configmod
from tokenlife.users import name_of


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_demo(keep: bool = False) -> int:
    from producer.keys import FileKeySource
    from producer.mint import Minter
    from repository.store import SqlTokenStore
    from tokenlife import jwtlite

    work = Path(tempfile.mkdtemp(prefix="tokenlife-demo-"))
    try:
        user = name_of(os.getuid())
        key_path = work / "jwt_hs256.key"
        key_path.write_bytes(secrets.token_bytes(32))
        key_path.chmod(0o600)
        _say(f"work directory {work}; signing key {key_path.name}: 32 random bytes, mode 0600")
        text = (
            f'[key]\npath = "{key_path}"\n'
            '[token]\nlifetime = "20s"\nrenew_until = "1m"\nrenew_before = "5s"\n'
            f'[store]\nurl = "sqlite:///{work}/tokenlife.db"\nspool_dir = "{work}/spool"\n'
            f'[login]\ntoken_dir = "{work}/run"\n'
            f"[producer]\nallow_privileged_users = {'true' if os.getuid() == 0 else 'false'}\n"
        )
        (work / "tokenlife.toml").write_text(text)
        config = configmod.load(work / "tokenlife.toml")
        _say("config: lifetime 20s, renew-until 1m (production defaults: 2d and 7d)")
        if os.getuid() == 0:
            _say(
                "running as root: the demo config allows a token for root; never do this "
                "in production (a root token can act as any user over slurmrestd)"
            )
        store = SqlTokenStore(config.store.url)
        key_source = FileKeySource(config.key)
        minter = Minter(config, key_source, store, login_dir=config.login.token_dir)
        record, _ = minter.mint(user, os.getuid(), actor="demo")
        _say(
            f"minted token {record.token_id} for {user}: exp in {record.exp - record.iat}s, "
            f"renewable until +{record.renew_until - record.first_issued}s"
        )
        path = config.login.token_dir / str(record.uid) / "slurm_jwt"
        st = path.stat()
        _say(
            f"login token file {path}: mode {stat.S_IMODE(st.st_mode):04o}, "
            f"owner uid {st.st_uid}, {st.st_size} bytes, no trailing newline"
        )
        claims = key_source.load().verify(path.read_text())
        _say(
            f"verified with the key: sun={claims['sun']} uid={claims['uid']} "
            f"gid={claims['gid']} gids={claims['id']['gids']}"
        )
        again, minted = minter.mint(user, os.getuid(), reuse=True, actor="demo")
        _say(f"a second login reuses the still-valid token: {again.token_id} (new mint: {minted})")
        header, _, _ = jwtlite.split(record.token)
        _say(f"token header {header}; the token itself is never logged")
        for r in store.records(user):
            _say(f"store: {r.user} {r.state} v{r.version} token {r.token_id}")
        _say("done")
        return 0
    finally:
        if keep:
            _say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
