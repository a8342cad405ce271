from __future__ import annotations

import json
import os
import pwd
import secrets
import stat
from dataclasses import replace
from pathlib import Path

import jwt
import pytest

from producer.mint import Minter
from producer.spool import SpoolStore
from repository.store import SqlTokenStore
from tests.conftest import run_cli, write_cli_site
from tokenlife.config import Config, ProducerConfig, TokenConfig
from tokenlife.errors import PermissionDenied
from tokenlife.records import TokenRecord
from tokenlife.testing.fakes import FakeClock, StaticKeySource
from tokenlife.users import lookup

KEY = secrets.token_bytes(32)


def _me() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def _ordinary() -> str:
    return "nobody" if os.geteuid() == 0 else _me()


@pytest.fixture(params=["sqlite", "spool"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> SqlTokenStore | SpoolStore:
    if request.param == "sqlite":
        return SqlTokenStore(f"sqlite:///{tmp_path}/db.sqlite")
    return SpoolStore(tmp_path / "spool")


def _minter(store: object, clock: FakeClock, tmp_path: Path, **token: object) -> Minter:
    config = Config(token=replace(TokenConfig(), **token))  # type: ignore[arg-type]
    return Minter(config, StaticKeySource(KEY), store, clock, login_dir=tmp_path / "run")  # type: ignore[arg-type]


def test_claims_and_limits(store: object, tmp_path: Path) -> None:
    clock = FakeClock()
    record, minted = _minter(store, clock, tmp_path).mint(_ordinary(), os.geteuid())
    assert minted
    now = int(clock.now())
    assert (record.iat, record.exp, record.renew_until) == (now, now + 2 * 86400, now + 7 * 86400)
    claims = jwt.decode(
        record.token, KEY, algorithms=["HS256"], options={"verify_exp": False, "verify_iat": False}
    )
    user = lookup(_ordinary())
    assert claims == {
        "iat": now,
        "exp": now + 2 * 86400,
        "sun": user.name,
        "uid": user.uid,
        "gid": user.gid,
        "id": {"gecos": user.gecos, "dir": user.dir, "shell": user.shell, "gids": list(user.gids)},
        # tokenlife's own: the chain's end and the token's number in it
        "tokenlife": {"renew_until": now + 7 * 86400, "version": 1},
    }
    assert record.token not in repr(record) and record.token not in str(record)


def test_lifetime_clamped_to_renew_until(store: object, tmp_path: Path) -> None:
    clock = FakeClock()
    record, _ = _minter(store, clock, tmp_path).mint(
        _ordinary(), os.geteuid(), lifetime=7200, renew_until=3600
    )
    assert record.exp == record.renew_until == int(clock.now()) + 3600


def test_reuse_until_due(store: object, tmp_path: Path) -> None:
    clock = FakeClock()
    minter = _minter(store, clock, tmp_path, lifetime=4000, renew_before=600, renew_fraction=0.25)
    first, _ = minter.mint(_ordinary(), os.geteuid(), reuse=True)
    clock.advance(2999)  # renewal window opens at exp - max(600, 1000)
    again, minted = minter.mint(_ordinary(), os.geteuid(), reuse=True)
    assert (again.token_id, minted) == (first.token_id, False)
    clock.advance(1)
    fresh, minted = minter.mint(_ordinary(), os.geteuid(), reuse=True)
    assert minted and fresh.token_id != first.token_id


def test_no_reuse_after_key_change(store: object, tmp_path: Path) -> None:
    clock = FakeClock()
    minter = _minter(store, clock, tmp_path)
    first, _ = minter.mint(_ordinary(), os.geteuid(), reuse=True)
    minter.key_source = StaticKeySource(secrets.token_bytes(32))
    second, minted = minter.mint(_ordinary(), os.geteuid(), reuse=True)
    assert minted and second.token_id != first.token_id


def test_login_file(store: object, tmp_path: Path) -> None:
    record, _ = _minter(store, FakeClock(), tmp_path).mint(_ordinary(), os.geteuid())
    path = tmp_path / "run" / str(record.uid) / "slurm_jwt"
    st = path.stat()
    assert path.read_text() == record.token  # exact: no newline
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, record.uid, record.gid)
    d = path.parent.stat()
    assert (stat.S_IMODE(d.st_mode), d.st_uid) == (0o700, record.uid)


def test_store_roundtrip(store: SqlTokenStore | SpoolStore, tmp_path: Path) -> None:
    record, _ = _minter(store, FakeClock(), tmp_path).mint(_ordinary(), os.geteuid())
    got = store.current(_ordinary())
    assert got == record and got is not None and got.token == record.token
    assert [r.token_id for r in store.records(_ordinary())] == [record.token_id]


def test_authorization(tmp_path: Path) -> None:
    minter = _minter(SpoolStore(tmp_path / "s"), FakeClock(), tmp_path)
    nobody = lookup("nobody")
    minter.authorize(nobody.uid, nobody)  # anyone may mint for themselves
    minter.authorize(0, nobody)  # root for anyone
    with pytest.raises(PermissionDenied, match="may not mint a token for 'root'"):
        minter.authorize(nobody.uid, lookup("root"))
    with pytest.raises(PermissionDenied, match="refusing to mint for privileged user 'root'"):
        minter.authorize(0, lookup("root"))
    allowed = replace(minter.config, producer=ProducerConfig(allow_privileged_users=True))
    minter.config = allowed
    minter.authorize(0, lookup("root"))
    minter.config = replace(allowed, producer=ProducerConfig(admins=("nobody",)))
    minter.authorize(nobody.uid, lookup("daemon"))


def test_spool_ingested_once(tmp_path: Path) -> None:
    spool = SpoolStore(tmp_path / "spool")
    record, _ = _minter(spool, FakeClock(), tmp_path).mint(_ordinary(), os.geteuid(), actor="pam")
    spooled = tmp_path / "spool" / f"{_ordinary()}.json"
    assert KEY.hex() not in spooled.read_text() and stat.S_IMODE(spooled.stat().st_mode) == 0o600
    store = SqlTokenStore(f"sqlite:///{tmp_path}/db.sqlite", tmp_path / "spool")
    assert store.current(_ordinary()) == record
    assert store.ingest_spool() == 0  # idempotent
    events = store.events(_ordinary())
    assert [(e["event"], e["actor"]) for e in events] == [("minted", "pam")]
    assert os.listdir(tmp_path / "spool") == []  # ingested records are deleted


def test_cli_mint_print_and_list(tmp_path: Path) -> None:
    cfg = write_cli_site(tmp_path, KEY)
    result = run_cli("-c", str(cfg), "mint", _ordinary(), "--print", "--lifetime", "1h")
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    claims = jwt.decode(token, KEY, algorithms=["HS256"])
    assert claims["sun"] == _ordinary() and claims["exp"] - claims["iat"] == 3600
    listed = run_cli("-c", str(cfg), "list", "--json")
    rows = json.loads(listed.stdout)
    assert [r["user"] for r in rows] == [_ordinary()] and token not in listed.stdout
    plain = run_cli("-c", str(cfg), "mint", _ordinary())
    assert plain.returncode == 0 and plain.stdout.startswith("minted token ")
    assert token.split(".")[2] not in plain.stdout + plain.stderr


def test_record_json_roundtrip() -> None:
    record = TokenRecord("id", "u", 1, 1, 1, 1, 2, 3, 1, "k", token="secret")
    assert TokenRecord.from_spool(json.loads(json.dumps(record.to_spool()))) == record
    assert "secret" not in json.dumps(record.public())
