"""transfer.ssh.SshPool keeps at most delivery.ssh.max_connections connections open.

Each pooled connection is a socket, a paramiko thread and memory here, and an
sshd session on its node: the pool closes the least recently used idle one
before it opens one more, and never one a push is using.  The real-sshd side
is in tests/integration/test_ssh_delivery.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tokenlife.config import ConfigError, SshConfig, parse
from transfer.ssh import SshPool


class FakeConn:
    def __init__(self, node: str) -> None:
        self.node = node
        self.sftp: Any = object()
        self.uid = 0
        self.lock = threading.Lock()
        self.users = 0
        self.seen: set[str] = set()
        self.closed = False

    def alive(self) -> bool:
        return not self.closed

    def close(self) -> None:
        self.closed = True


class CountingPool(SshPool):
    """A pool whose connections are fakes; it notes how many were open at most."""

    def __init__(self, limit: int, connect_delay: float = 0.0) -> None:
        super().__init__(SshConfig(max_connections=limit, concurrency=1))
        self.opened: list[FakeConn] = []
        self.delay = connect_delay
        self.most_open = 0
        self._count = threading.Lock()

    def _connect(self, node: str) -> Any:
        time.sleep(self.delay)
        conn = FakeConn(node)
        with self._count:
            self.opened.append(conn)
            self.most_open = max(self.most_open, sum(not c.closed for c in self.opened))
        return conn


def use(pool: SshPool, node: str) -> None:
    with pool.fs(node):
        pass


def test_the_least_recently_used_connection_is_closed_first() -> None:
    pool = CountingPool(limit=3)
    for node in ("a", "b", "c"):
        use(pool, node)
    use(pool, "a")  # "b" is now the least recently used
    use(pool, "d")
    assert pool.connected() == ["a", "c", "d"]
    assert [c.node for c in pool.opened if c.closed] == ["b"]
    use(pool, "a")  # still pooled: not opened again
    assert [c.node for c in pool.opened].count("a") == 1
    assert pool.most_open == 3


def test_a_connection_in_use_is_never_closed_for_room() -> None:
    pool = CountingPool(limit=2)
    use(pool, "b")
    with pool.fs("a"):  # "a" is in use, and older than "b" in the pool order below
        pool._conns.move_to_end("b")
        use(pool, "c")  # room is made by closing "b", the idle one
        assert pool.connected() == ["a", "c"]
        assert not next(c for c in pool.opened if c.node == "a").closed


def test_many_threads_on_many_nodes_never_exceed_the_limit() -> None:
    limit, workers = 8, 8
    pool = CountingPool(limit=limit, connect_delay=0.002)
    nodes = [f"n{i:02d}" for i in range(40)]
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(60):
                use(pool, nodes[(k * 7 + i * 3) % len(nodes)])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert pool.most_open <= limit
    assert len(pool.connected()) <= limit
    open_now = [c for c in pool.opened if not c.closed]
    assert sorted(c.node for c in open_now) == pool.connected()  # nothing leaked
    assert all(c.users == 0 for c in open_now)


def test_two_callers_opening_one_node_keep_one_connection() -> None:
    pool = CountingPool(limit=4, connect_delay=0.05)
    threads = [threading.Thread(target=use, args=(pool, "a")) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pool.connected() == ["a"]
    assert sum(not c.closed for c in pool.opened) == 1


def test_close_closes_everything() -> None:
    pool = CountingPool(limit=4)
    for node in ("a", "b"):
        use(pool, node)
    pool.close()
    assert pool.connected() == []
    assert all(c.closed for c in pool.opened)


def test_the_limit_must_hold_every_concurrent_push(tmp_path: Path) -> None:
    data = {"delivery": {"ssh": {"concurrency": 64, "max_connections": 63}}}
    with pytest.raises(ConfigError, match=r"max_connections: must be at least .*\(64\)"):
        parse(data)
    assert parse({"delivery": {"ssh": {"max_connections": 32}}}).delivery.ssh.max_connections == 32
    assert parse({}).delivery.ssh.max_connections == 4096


FDLIMIT = """
import logging, resource, sys
from tokenlife.app import fdlimit
from tokenlife.config import parse
logging.basicConfig(level=logging.WARNING, format="%(message)s")
config = parse({"delivery": {"ssh": {"max_connections": 2000}},
                "pull": {"listen": "127.0.0.1:6821", "max_connections": 100}})
print(fdlimit.ensure(config), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


@pytest.mark.parametrize(
    ("hard", "soft_after", "warned"),
    [(8192, 2000 + 100 + 256, False), (1500, 1500, True), (1024, 1024, True)],
)
def test_the_open_files_limit_is_raised_for_the_pool(
    hard: int, soft_after: int, warned: bool
) -> None:
    import resource
    import subprocess
    import sys

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))

    run = subprocess.run(
        [sys.executable, "-c", FDLIMIT],
        capture_output=True,
        text=True,
        preexec_fn=limits,
        cwd=Path(__file__).resolve().parents[2],
        check=True,
    )
    assert run.stdout.split() == [str(soft_after)] * 2
    assert ("open files limit" in run.stderr) is warned
    if warned:
        assert f"below the {2000 + 100 + 256} this configuration may use" in run.stderr
