"""A local user cannot wedge the login path (issue 12, finding 2).

The login token file lives in a directory its user owns: a FIFO or symlink
put there must neither hang the minter (which would hold up every login
behind it) nor be followed; and a mint service that does not answer must
not leave a login without a token: PAM then mints itself.
"""

from __future__ import annotations

import os
import pwd
import secrets
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer.mint import Minter
from producer.spool import SpoolStore
from tests.conftest import require_root, run_cli, write_cli_site
from tokenlife.config import Config
from tokenlife.testing.fakes import FakeClock, StaticKeySource

KEY = secrets.token_bytes(32)


def finishes(work: threading.Thread, within: float = 20.0) -> bool:
    work.start()
    work.join(within)
    return not work.is_alive()


@pytest.mark.parametrize("trap", ["fifo", "symlink"])
def test_a_trap_at_the_login_file_is_replaced_not_opened(tmp_path: Path, trap: str) -> None:
    require_root()
    user = pwd.getpwnam("nobody")
    login = tmp_path / "login"
    user_dir = login / str(user.pw_uid)
    user_dir.mkdir(parents=True)
    os.chown(user_dir, user.pw_uid, user.pw_gid)
    target = user_dir / "slurm_jwt"
    victim = tmp_path / "victim"
    victim.write_text("root's file")
    if trap == "fifo":
        os.mkfifo(target)
    else:
        target.symlink_to(victim)
    minter = Minter(
        Config(), StaticKeySource(KEY), SpoolStore(tmp_path / "spool"), FakeClock(), login
    )
    done: list[str] = []
    work = threading.Thread(
        target=lambda: done.append(minter.mint("nobody", 0, reuse=True)[0].token), daemon=True
    )
    assert finishes(work), "minting hung on the user's login file"
    st = os.lstat(target)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == user.pw_uid
    assert target.read_text() == done[0]
    assert victim.read_text() == "root's file"
    # The next login reuses the token and finds the (now regular) file in place.
    work = threading.Thread(target=lambda: minter.mint("nobody", 0, reuse=True), daemon=True)
    assert finishes(work)


@pytest.fixture
def silent_service(tmp_path: Path) -> Iterator[Path]:
    """A mint socket that accepts and never answers (a wedged or overloaded service)."""
    path = tmp_path / "mint.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield path
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_pam_mints_itself_when_the_service_does_not_answer(
    tmp_path: Path, silent_service: Path
) -> None:
    require_root()
    cfg = write_cli_site(tmp_path, KEY)
    env = {"PAM_TYPE": "open_session", "PAM_USER": "nobody", "TOKENLIFE_CONFIG": str(cfg)}
    started = time.monotonic()
    proc = run_cli("pam", "--socket", str(silent_service), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "did not answer" in proc.stderr and "minting here" in proc.stderr
    assert time.monotonic() - started < 60  # bounded, not a hang (the limit is 5 s)
    uid = pwd.getpwnam("nobody").pw_uid
    assert (tmp_path / "spool" / "nobody.json").exists()
    assert (tmp_path / "run" / str(uid) / "slurm_jwt").stat().st_size > 100
