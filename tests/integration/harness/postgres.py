"""A throwaway PostgreSQL 15 cluster on loopback, for integration tests.

Debian's binaries (``/usr/lib/postgresql/15/bin``) refuse to run as root, so
``initdb``, ``pg_ctl`` and the server run as the ``postgres`` OS user (via
``setpriv``) on a fresh data directory. The cluster listens on 127.0.0.1 only,
at a free port, with its unix socket inside its own work directory (never
``/var/run/postgresql``), and durability is off (``fsync``, ``full_page_writes``,
``synchronous_commit``): it is fast to start (about a second) and to write.

Authentication: the unix socket is ``trust`` (only root and ``postgres`` can
reach it: the work directory is 0700 postgres), loopback TCP is
``scram-sha-256``. The harness administers the cluster over the socket as the
superuser; applications get a SQLAlchemy URL for an ordinary role with a
random password that owns the databases made by :meth:`create_database`.

The work directory is always a fresh ``mkdtemp`` in a directory the
``postgres`` user can traverse: pytest's ``tmp_path`` (under a 0700 root-owned
directory) cannot hold a data directory another user must open, so a
``parent`` that ``postgres`` cannot reach is replaced by the system temp dir.
Needs root, Debian's ``postgresql-15`` and ``psycopg`` (3).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

import psycopg
from psycopg import sql

PG_BIN = Path("/usr/lib/postgresql/15/bin")
OS_USER = "postgres"
SUPERUSER = "postgres"
APP_ROLE = "tokenlife"
PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
_IDENT = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class PostgresError(RuntimeError):
    """The cluster failed to initialise or start, or an admin command failed."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (racy: :meth:`start` retries on a clash)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _traversable(path: Path, pw: pwd.struct_passwd) -> bool:
    """Whether ``pw``'s user can reach (search) every directory down to ``path``."""
    groups = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if pw.pw_name in g.gr_mem}
    full = path.resolve()
    for directory in (*reversed(full.parents), full):
        try:
            st = directory.stat()
        except OSError:
            return False
        if st.st_uid == pw.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


class PostgresServer:
    """One PostgreSQL cluster: ``start()``/``stop()`` or ``with PostgresServer() as pg:``."""

    def __init__(
        self,
        parent: Path | None = None,
        bin_dir: Path = PG_BIN,
        os_user: str = OS_USER,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.bin_dir = bin_dir
        self.pw = pwd.getpwnam(os_user)
        self.parent = parent
        # Extra postgresql.conf lines (value written verbatim: quote strings).
        self.settings = dict(settings or {})
        self.host = "127.0.0.1"
        self.port = 0
        self.app_role = APP_ROLE
        self.app_password = secrets.token_urlsafe(24)
        self.workdir: Path | None = None
        self._init_output = ""
        self._last_log = ""
        self._running = False

    # -- paths ----------------------------------------------------------------

    def _path(self, name: str) -> Path:
        if self.workdir is None:
            raise PostgresError("the cluster has not been started")
        return self.workdir / name

    @property
    def data_dir(self) -> Path:
        return self._path("data")

    @property
    def socket_dir(self) -> Path:
        return self._path("socket")

    @property
    def log_file(self) -> Path:
        return self._path("postgres.log")

    # -- lifecycle ------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """initdb, configure, start and create the application role; ~1 s."""
        if self._running:
            return
        try:
            self._make_workdir()
            self._initdb()
            last = ""
            for _attempt in range(3):
                self.port = free_port(self.host)
                self._configure()
                result = self._pg_ctl("start", "-w", "-t", "30", "-l", str(self.log_file))
                if result.returncode == 0:
                    self._running = True
                    break
                last = result.stdout + result.stderr
                if "Address already in use" not in self.logs():
                    break  # a clash on the port is the only failure worth a retry
            if not self._running:
                raise PostgresError(f"pg_ctl start failed: {last.strip()}\n{self.logs()}")
            with self.admin() as conn:
                conn.execute(
                    sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                        sql.Identifier(self.app_role), sql.Literal(self.app_password)
                    )
                )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server (immediate mode) and remove the work directory; idempotent."""
        workdir, self.workdir = self.workdir, None
        if workdir is None:
            return
        try:
            if self._running or (workdir / "data" / "postmaster.pid").exists():
                self._stop_server(workdir)
        finally:
            self._running = False
            with contextlib.suppress(OSError):  # logs() still answers after stop()
                self._last_log = (workdir / "postgres.log").read_text(errors="replace")
            shutil.rmtree(workdir, ignore_errors=True)

    def pause(self) -> None:
        """Stop the server (fast mode: clients are cut off) but keep its data: an outage."""
        result = self._pg_ctl("stop", "-m", "fast", "-w", "-t", "30")
        if result.returncode != 0:
            raise PostgresError(f"pg_ctl stop failed: {result.stdout}{result.stderr}")

    def resume(self) -> None:
        """Start a paused server again, on the same port."""
        result = self._pg_ctl("start", "-w", "-t", "30", "-l", str(self.log_file))
        if result.returncode != 0:
            raise PostgresError(f"pg_ctl start failed: {result.stdout}{result.stderr}")

    def _stop_server(self, workdir: Path) -> None:
        data = workdir / "data"
        result = subprocess.run(
            [*self._as_user(), str(self.bin_dir / "pg_ctl"), "stop", "-D", str(data),
             "-m", "immediate", "-w", "-t", "10"],
            capture_output=True, text=True, timeout=30, check=False, env=self._env(),
        )  # fmt: skip
        if result.returncode == 0:
            return
        # pg_ctl failed (timeout, damaged pid file): kill the postmaster itself.
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((data / "postmaster.pid").read_text().splitlines()[0])
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                os.kill(pid, 0)  # raises once it is gone
                time.sleep(0.05)

    # -- databases ------------------------------------------------------------

    def url(self, database: str) -> str:
        """SQLAlchemy URL of ``database`` for the application role, over loopback TCP."""
        return (
            f"postgresql+psycopg://{quote(self.app_role, safe='')}:"
            f"{quote(self.app_password, safe='')}@{self.host}:{self.port}/{database}"
        )

    def create_database(self, name: str) -> str:
        """Create ``name`` owned by the application role; return its SQLAlchemy URL."""
        ident = _identifier(name)
        with self.admin() as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(ident, sql.Identifier(self.app_role))
            )
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name``, disconnecting whoever is still connected; absent is fine."""
        with self.admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(_identifier(name))
            )

    def admin(self, database: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        """An autocommit superuser connection over the unix socket (close it: ``with``)."""
        if not self._running:
            raise PostgresError("the cluster is not running")
        return psycopg.connect(
            host=str(self.socket_dir),
            port=self.port,
            user=SUPERUSER,
            dbname=database,
            autocommit=True,
            connect_timeout=10,
        )

    def logs(self) -> str:
        """initdb's output and the server log so far (for failure messages)."""
        if self.workdir is None:
            return self._init_output + self._last_log
        with contextlib.suppress(OSError):
            return self._init_output + self.log_file.read_text(errors="replace")
        return self._init_output

    # -- internals ------------------------------------------------------------

    def _as_user(self) -> list[str]:
        return [
            "setpriv",
            f"--reuid={self.pw.pw_uid}",
            f"--regid={self.pw.pw_gid}",
            "--init-groups",
        ]

    def _env(self) -> dict[str, str]:
        return {
            "PATH": PATH,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "HOME": self.pw.pw_dir,
            "TZ": "UTC",
        }

    def _make_workdir(self) -> None:
        parent = self.parent
        if parent is None or not _traversable(parent, self.pw):
            parent = Path(tempfile.gettempdir())
            if not _traversable(parent, self.pw):
                parent = Path("/tmp")
        workdir = Path(tempfile.mkdtemp(prefix="tl-pg-", dir=parent))
        # The unix socket path must stay under ~107 bytes.
        if len(str(workdir / "socket" / ".s.PGSQL.65535.lock")) > 100:
            shutil.rmtree(workdir, ignore_errors=True)
            workdir = Path(tempfile.mkdtemp(prefix="tl-pg-", dir="/tmp"))
        self.workdir = workdir
        for sub in ("socket",):
            (workdir / sub).mkdir(mode=0o700)
            os.chown(workdir / sub, self.pw.pw_uid, self.pw.pw_gid)
        os.chown(workdir, self.pw.pw_uid, self.pw.pw_gid)  # stays 0700: postgres only

    def _run_as(self, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self._as_user(), *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=self._env(),
            cwd=str(self.workdir),
        )

    def _initdb(self) -> None:
        result = self._run_as(
            [
                str(self.bin_dir / "initdb"),
                "-D", str(self.data_dir),
                "-U", SUPERUSER,
                "-E", "UTF8",
                "--locale=C.UTF-8",
                "--auth-local=trust",
                "--auth-host=reject",  # pg_hba.conf is rewritten below
                "--no-sync",
                "--no-instructions",
            ]
        )  # fmt: skip
        self._init_output = result.stdout + result.stderr
        if result.returncode != 0:
            raise PostgresError(f"initdb failed ({result.returncode}):\n{self._init_output}")

    def _configure(self) -> None:
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "32MB",
            "timezone": "'UTC'",
            "log_min_messages": "warning",
            "log_line_prefix": "'%m [%p] %q%u@%d '",
            "password_encryption": "'scram-sha-256'",
            **self.settings,
        }
        # An include file read last, rewritten on every attempt (the port changes).
        (self.data_dir / "tokenlife_test.conf").write_text(
            "".join(f"{key} = {value}\n" for key, value in conf.items())
        )
        main = self.data_dir / "postgresql.conf"
        text = main.read_text()
        if "include = 'tokenlife_test.conf'" not in text:
            main.write_text(text + "\ninclude = 'tokenlife_test.conf'\n")
        (self.data_dir / "pg_hba.conf").write_text(
            "# TYPE  DATABASE  USER  ADDRESS        METHOD\n"
            "local   all       all                  trust\n"
            "host    all       all   127.0.0.1/32   scram-sha-256\n"
        )
        for name in ("tokenlife_test.conf", "postgresql.conf", "pg_hba.conf"):
            os.chown(self.data_dir / name, self.pw.pw_uid, self.pw.pw_gid)

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self._run_as([str(self.bin_dir / "pg_ctl"), *args[:1], "-D", str(self.data_dir),
                             *args[1:]])  # fmt: skip


def _identifier(name: str) -> sql.Identifier:
    if not _IDENT.fullmatch(name):
        raise ValueError(f"not a plain database name: {name!r}")
    return sql.Identifier(name)
