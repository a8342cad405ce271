"""Service accounts ([[service]]) on a real SQLite store with a fake clock: the keeper
mints the first token and new chains, the renewer renews them in between, and the
token file (local transport) holds a valid token at every moment."""

from __future__ import annotations

import logging
import os
import pwd
import secrets
import stat
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from producer.mint import Minter
from repository.renewer import Renewer
from repository.services import ServiceKeeper, service_status
from repository.store import SqlTokenStore
from tokenlife.config import Config, DeliveryConfig, ServiceConfig, TokenConfig
from tokenlife.records import TokenFile
from tokenlife.slurm_jwt import SlurmJwt
from tokenlife.testing.fakes import FakeClock, StaticKeySource
from transfer.service_delivery import ServiceDelivery
from transfer.transports import LocalTransport

KEY = secrets.token_bytes(32)
USER = "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
PW = pwd.getpwnam(USER)
PATH = "/etc/svc/jwt"
LIFETIME, RENEW_UNTIL, TICK = 40, 100, 5  # margin: min(max(10, 40 // 4), 40 // 2) = 10


@dataclass
class World:
    tmp: Path
    clock: FakeClock
    config: Config
    store: SqlTokenStore
    key: StaticKeySource
    minter: Minter
    renewer: Renewer
    keeper: ServiceKeeper
    delivery: ServiceDelivery

    def tick(self) -> None:
        """What the daemon's tick does: renew, keep the services, deliver."""
        self.renewer.tick()
        self.keeper.keep()
        self.delivery.run()

    def node(self, host: str, path: str = PATH) -> Path:
        return self.tmp / "nodes" / host / path.lstrip("/")


def world(tmp_path: Path, *services: ServiceConfig, hosts: tuple[str, ...] = ("h1",)) -> World:
    clock = FakeClock()
    services = services or (service(hosts=hosts),)
    for entry in services:
        for host in entry.hosts:
            parent = tmp_path / "nodes" / host / entry.path.lstrip("/").rpartition("/")[0]
            parent.mkdir(parents=True, exist_ok=True)
    config = Config(
        token=replace(
            TokenConfig(), lifetime=3600, renew_until=86400, renew_before=10, renew_fraction=0.25
        ),
        delivery=DeliveryConfig(transport="local", root=tmp_path / "nodes", jobs="static"),
        services=services,
    )
    store = SqlTokenStore(f"sqlite:///{tmp_path}/db")
    key = StaticKeySource(KEY)
    minter = Minter(config, key, store, clock)
    transport = LocalTransport(config.delivery.remote_dir, config.delivery.root)
    return World(
        tmp_path,
        clock,
        config,
        store,
        key,
        minter,
        Renewer(config, key, store, clock),
        ServiceKeeper(config, minter, store, clock),
        ServiceDelivery(config, store, transport, clock=clock),
    )


def service(**changes: object) -> ServiceConfig:
    base = ServiceConfig(
        user=USER,
        hosts=("h1",),
        path=PATH,
        lifetime=LIFETIME,
        renew_until=RENEW_UNTIL,
        owner=USER,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def valid_at(w: World, text: str, now: int) -> tuple[str, int, int]:
    """(token id's iat, exp, version) of a token that is valid at ``now``, signed by our key."""
    claims = w.key.key.verify(text)
    view = SlurmJwt().read(text)
    assert view.subject == USER and claims["sun"] == USER
    assert view.iat <= now < view.exp, (view, now)
    assert view.version is not None
    return text, view.exp, view.version


def test_first_token_renewals_and_new_chains_never_a_moment_without(tmp_path: Path) -> None:
    w = world(tmp_path)
    t0 = int(w.clock.now())
    chains: dict[str, int] = {}  # token id -> highest version seen
    files: set[str] = set()
    for second in range(0, 600):
        now = t0 + second
        w.clock.t = float(now)
        if second % TICK == 0:
            w.tick()
        current = w.store.current(USER)
        assert current is not None, f"no token at +{second}s"
        assert current.iat <= now < current.exp, f"the store's token is not valid at +{second}s"
        valid_at(w, current.token, now)
        chains[current.token_id] = max(chains.get(current.token_id, 0), current.version)
        on_node = w.node("h1").read_text()
        valid_at(w, on_node, now)  # the service host's file, too, at every second
        files.add(on_node)
    assert len(chains) >= 3, chains  # several chains, each renewed in between
    assert all(version >= 2 for version in list(chains.values())[:-1]), chains
    events = w.store.events(USER)
    minted = [e for e in events if e["event"] == "minted"]
    assert len(minted) == len(chains) and {e["actor"] for e in minted} == {"service"}
    assert minted[0]["reason"] == "service account: no active token"
    assert all("ends in" in str(e["reason"]) for e in minted[1:])
    assert sum(e["event"] == "superseded" for e in events) == len(chains) - 1
    # Each renewal and chain reached the file once, and only then.
    delivered = [e for e in events if e["event"] == "delivered"]
    assert len(delivered) == len(files)
    assert {e["reason"] for e in delivered} == {f"node h1: {PATH}"}


def test_the_file_has_the_owner_group_and_mode_asked_for(tmp_path: Path) -> None:
    group = 0 if os.geteuid() == 0 else PW.pw_gid
    w = world(tmp_path, service(mode=0o640, group="root" if group == 0 else None))
    w.tick()
    st = w.node("h1").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, PW.pw_uid, group)
    assert stat.S_IMODE(w.node("h1").parent.stat().st_mode) == 0o755  # untouched
    # A changed mode is put back at the next cycle (the same token, written anew).
    w.node("h1").chmod(0o644)
    summary = w.delivery.run()
    assert (summary.delivered, summary.unchanged) == (1, 0)
    assert stat.S_IMODE(w.node("h1").stat().st_mode) == 0o640


def test_unchanged_is_not_rewritten_and_older_never_replaces_newer(tmp_path: Path) -> None:
    w = world(tmp_path)
    w.tick()
    inode = w.node("h1").stat().st_ino
    assert w.delivery.run().line() == "service files: delivered 0, unchanged 1, failed 0"
    assert w.node("h1").stat().st_ino == inode
    old = w.store.current(USER)
    assert old is not None
    w.clock.advance(31)
    w.tick()  # renewed: v2 on the node
    newer = w.node("h1").read_text()
    assert SlurmJwt().read(newer).version == 2
    # A late pusher with v1 (a slow replica, a retry) finds v2 there.
    sf = w.delivery.transport.put_file  # type: ignore[attr-defined]
    from tokenlife.records import ServiceFile

    late = ServiceFile(PATH, PW.pw_uid, PW.pw_gid, 0o600, TokenFile.of(old))
    assert sf("h1", late, SlurmJwt().read) == "newer-there"
    assert w.node("h1").read_text() == newer
    # ... but an expired token there is no reason to keep it.
    w.clock.advance(1000)
    fresh = w.minter.mint_service(USER, LIFETIME, RENEW_UNTIL, False, "test")
    assert sf("h1", replace(late, token=TokenFile.of(fresh)), SlurmJwt().read) == "installed"


def test_a_symlink_at_the_path_is_replaced_never_followed(tmp_path: Path) -> None:
    w = world(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("keep")
    w.node("h1").symlink_to(victim)
    w.tick()
    assert not w.node("h1").is_symlink() and w.node("h1").is_file()
    assert victim.read_text() == "keep"


def test_each_host_on_its_own(tmp_path: Path) -> None:
    w = world(tmp_path, hosts=("h1", "h2", "h3", "h4"))
    (tmp_path / "nodes/h2/etc/svc").rmdir()  # no directory
    (tmp_path / "nodes/h3/etc/svc").chmod(0o777)  # others could swap the file
    (tmp_path / "nodes/h4/etc/svc").rmdir()
    (tmp_path / "nodes/h4/etc/svc").symlink_to(tmp_path / "nodes/h1/etc/svc")
    w.keeper.keep()
    summary = w.delivery.run()
    assert (summary.delivered, summary.failed) == (1, 3)
    assert sorted(summary.errors) == [
        f"service {USER}: h2: /etc/svc does not exist",
        f"service {USER}: h3: /etc/svc must be owned by root and not group/world-writable",
        f"service {USER}: h4: /etc/svc is not a directory",
    ]
    token = w.node("h1").read_text()
    assert w.store.current(USER) is not None and token == w.store.current(USER).token  # type: ignore[union-attr]
    assert sorted(os.listdir(tmp_path / "nodes/h1/etc/svc")) == ["jwt"]  # no temp file, no lock
    # Fixed: delivered at the next cycle; the others are left alone.
    (tmp_path / "nodes/h2/etc/svc").mkdir()
    summary = w.delivery.run()
    assert (summary.delivered, summary.unchanged, summary.failed) == (1, 1, 2)
    assert w.node("h2").read_text() == token

    now = int(w.clock.now())
    (status,) = service_status(w.store, w.config.services, now)
    assert status["token"]["version"] == 1 and status["path"] == PATH
    assert status["hosts"]["h1"]["current"] and status["hosts"]["h2"]["current"]
    assert status["hosts"]["h3"] is None and status["hosts"]["h4"] is None


def test_keeper_counts_revocation_and_isolation(tmp_path: Path) -> None:
    w = world(tmp_path, service(), service(user="tl-no-such-user", path="/etc/svc/other"))
    summary = w.keeper.keep()
    assert (summary.minted, summary.kept, summary.failed) == (1, 0, 1)
    assert summary.errors == ["service tl-no-such-user: unknown user 'tl-no-such-user'"]
    assert w.keeper.keep().line() == "services: minted 0, kept 1, failed 1"
    first = w.store.current(USER)
    assert first is not None
    # Revoked: the service gets a new chain at once (as k5start would re-authenticate).
    w.store.renewals.set_state(USER, "revoked", "revoked", "test", "", int(w.clock.now()))
    assert w.keeper.keep().minted == 1
    second = w.store.current(USER)
    assert second is not None and second.token_id != first.token_id
    # Delivery: the unknown user's file fails alone, in one line.
    summary = w.delivery.run()
    assert (summary.delivered, summary.failed) == (1, 1)
    assert summary.errors == ["service tl-no-such-user: user: unknown user 'tl-no-such-user'"]


def test_a_chain_longer_than_the_entry_allows_is_replaced(tmp_path: Path) -> None:
    w = world(tmp_path)
    w.minter.mint(USER, 0, lifetime=3600, write_login=False)  # a login's longer chain
    w.keeper.keep()
    current = w.store.current(USER)
    assert current is not None and current.lifetime == LIFETIME
    assert w.keeper.keep().kept == 1


def test_privileged_accounts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    w = world(tmp_path, service(user="root", owner="root"))
    summary = w.keeper.keep()
    assert (
        summary.failed == 1
        and "refusing to mint for privileged service account 'root'" in (summary.errors[0])
    )
    assert w.store.current("root") is None
    w = world(tmp_path / "b", service(user="root", owner="root", allow_privileged=True))
    caplog.set_level(logging.WARNING)
    for _ in range(2):
        w.clock.advance(RENEW_UNTIL)  # each time a new chain: each mint warns
        assert w.keeper.keep().minted == 1
    warnings = [r.getMessage() for r in caplog.records if "PRIVILEGED" in r.getMessage()]
    assert len(warnings) == 2
    assert warnings[0].startswith("service root: minted a PRIVILEGED token (uid 0, token id ")


def test_a_transport_without_put_file(tmp_path: Path) -> None:
    w = world(tmp_path)

    class Plain:
        def put(self, node: str, tf: TokenFile) -> str:
            raise AssertionError

        def remove(self, node: str, uid: int) -> bool:
            raise AssertionError

        def close(self) -> None:
            pass

    w.keeper.keep()
    summary = ServiceDelivery(w.config, w.store, Plain(), clock=w.clock).run()
    assert summary.failed == 1
    assert summary.errors == [
        f"service {USER}: h1: delivery.transport 'local' cannot put service files (no put_file)"
    ]
