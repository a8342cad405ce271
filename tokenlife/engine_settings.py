"""The ``[engine]`` table, read on worker nodes by ``tokenlife-engine``.

Standard library only, and no dataclasses or typing at run time: the
TaskProlog runs ``tokenlife-engine env`` before every task of every job, so
its imports are paid millions of times (``tokenlife.config`` costs several
milliseconds more).  ``tokenlife.config`` validates the same table through
:func:`parse`, so ``tokenlife config check`` and the engine agree.
"""

from __future__ import annotations

import os
import stat

from tokenlife.durations import parse_duration

DEFAULT_CONFIG = "/etc/tokenlife/tokenlife.toml"
ENV_VAR = "TOKENLIFE_CONFIG"
#: which tasks get SLURM_JWT (see docs/engine.md: srun and sstat need munge)
EXPORT_MODES = ("always", "steps", "never")
#: where ``tokenlife-engine install-wrappers`` puts the Slurm command wrappers
DEFAULT_WRAPPER_DIR = "/usr/libexec/tokenlife/slurm"
#: a job may choose its own mode with this variable in its environment
JOB_OVERRIDE = "TOKENLIFE_EXPORT_JWT"
#: a configuration file is a few KiB: a bigger one is refused, not read
MAX_CONFIG_SIZE = 1 << 20


class EngineSettings:
    __slots__ = (
        "advisory_window",
        "export_jwt",
        "mandatory_window",
        "munge_socket",
        "pull",
        "pull_server_user",
        "pull_timeout",
        "slurm_bin_dir",
        "token_dir",
        "wrapper_dir",
    )

    def __init__(
        self,
        token_dir: str = "/run/tokenlife",  # noqa: S107 - a directory, not a secret
        export_jwt: str = "always",
        advisory_window: int = 900,
        mandatory_window: int = 600,
        wrapper_dir: str = DEFAULT_WRAPPER_DIR,
        slurm_bin_dir: str = "",
        pull: str = "",
        pull_timeout: float = 5.0,
        pull_server_user: str = "tokenlife",
        munge_socket: str = "",
    ) -> None:
        self.token_dir = token_dir
        self.export_jwt = export_jwt
        #: the wrappers' directory, put first in every task's PATH ("" = none)
        self.wrapper_dir = wrapper_dir
        #: where the wrappers find the real commands ("" = PATH after theirs)
        self.slurm_bin_dir = slurm_bin_dir
        #: this close to exp, look for a newer token more eagerly
        self.advisory_window = advisory_window
        #: this close to exp, warn loudly: renewal or delivery is failing
        self.mandatory_window = mandatory_window
        #: the pull service(s), HOST:PORT[,HOST:PORT...] ("" = never pull)
        self.pull = pull
        #: seconds a pull may take (and make a task wait), retries included
        self.pull_timeout = pull_timeout
        #: the account the pull service runs as: requests are sealed for it and
        #: replies made by anyone else refused ("" = do not check)
        self.pull_server_user = pull_server_user
        #: this node's munged socket ("" = libmunge's default)
        self.munge_socket = munge_socket

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EngineSettings) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__
        )

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"EngineSettings({fields})"


def _abspath(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise ValueError("expected an absolute path")
    if "/../" in f"{value}/":
        raise ValueError("'..' is not allowed in paths")
    return os.path.normpath(value)


def _optional_path(value: object) -> str:
    if value == "":
        return ""
    path = _abspath(value)
    # The wrappers write it into shell scripts and PATH: keep it plain.
    if not set(path) <= _PLAIN_PATH_CHARS:
        raise ValueError("only letters, digits and /._+- are allowed here")
    return path


_PLAIN_PATH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._+-")


def _mode(value: object) -> str:
    if value not in EXPORT_MODES:
        raise ValueError(f"expected one of {', '.join(EXPORT_MODES)}")
    return str(value)


def _duration(value: object) -> int:
    if not isinstance(value, str | int):
        raise ValueError("expected a duration such as 90, 30m, 1h, 2d or 1w")
    return parse_duration(value)


#: a pull may hold up a task (the TaskProlog waits for it): keep it short
MAX_PULL_TIMEOUT = 60.0


def _pull_addresses(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError('expected HOST:PORT[,HOST:PORT...] or ""')
    if value.strip() == "":
        return ""
    entries = [entry.strip() for entry in value.split(",")]
    for entry in entries:
        if not entry:
            raise ValueError("an empty address in the list")
        _host_port(entry)
    return ",".join(entries)


def _host_port(entry: str) -> None:
    """HOST:PORT or [V6]:PORT, as client_engine.pull.parse_address reads it."""
    shown = repr(entry[:80])
    host, sep, port = entry.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{shown}: write an IPv6 address as [ADDRESS]:PORT")
    if not sep or not host or not (port.isascii() and port.isdigit()):
        raise ValueError(f"{shown} is not HOST:PORT")
    if not 0 < int(port) <= 65535:
        raise ValueError(f"{shown}: port out of range")
    if not (host.isascii() and host.isprintable()) or " " in host:
        raise ValueError(f"{shown}: not a host name or address")


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("expected a number of seconds")
    if not 0 < value <= MAX_PULL_TIMEOUT:
        raise ValueError(f"expected more than 0 and at most {MAX_PULL_TIMEOUT:g} seconds")
    return float(value)


def _account(value: object) -> str:
    """A user name (POSIX portable, as useradd takes it), a uid, or "" (no check)."""
    if not isinstance(value, str):
        raise ValueError('expected a user name, a uid, or ""')
    if value == "":
        return value
    if value.isascii() and value.isdigit():
        if len(value) > 10 or int(value) > MAX_UID:
            raise ValueError(f"{value[:12]!r} is not a uid")
        return value
    if not set(value) <= _NAME_CHARS or value[0] == "-" or len(value) > 32:
        raise ValueError(f"{value[:40]!r} is not a user name")
    return value


#: (uid_t)-1 means "no uid" to the kernel
MAX_UID = 0xFFFFFFFE
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def _optional_abspath(value: object) -> str:
    return "" if value == "" else _abspath(value)


_CONVERT = {
    "token_dir": _abspath,
    "export_jwt": _mode,
    "advisory_window": _duration,
    "mandatory_window": _duration,
    "wrapper_dir": _optional_path,
    "slurm_bin_dir": _optional_path,
    "pull": _pull_addresses,
    "pull_timeout": _seconds,
    "pull_server_user": _account,
    "munge_socket": _optional_abspath,
}
KEYS = tuple(_CONVERT)


def parse(table: object) -> EngineSettings:
    """Settings from the ``[engine]`` table; ValueError("engine.KEY: reason")."""
    if not isinstance(table, dict):
        raise ValueError("engine: expected a table")
    values: dict[str, object] = {}
    for key, value in table.items():
        convert = _CONVERT.get(key)
        if convert is None:
            # quoted unless plain: a key with a newline must not break the line
            shown = key if isinstance(key, str) and key.isidentifier() else repr(key)
            raise ValueError(f"engine.{shown}: unknown key")
        try:
            values[key] = convert(value)
        except ValueError as exc:
            raise ValueError(f"engine.{key}: {exc}") from None
    settings = EngineSettings(**values)  # type: ignore[arg-type]  # converted above
    if settings.mandatory_window > settings.advisory_window:
        raise ValueError("engine.mandatory_window: must not be longer than advisory_window")
    return settings


def read_config(path: str) -> bytes:
    """The contents of the configuration file at ``path``, for this module and
    tokenlife.config alike.

    It must be a regular file of at most MAX_CONFIG_SIZE bytes, which is
    checked on the opened descriptor before anything is read: a FIFO would
    wait for a writer forever (so it is opened without blocking) and
    /dev/zero never ends.  FileNotFoundError if there is no file; ValueError
    ("PATH: reason", one line) for anything else.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except PermissionError:
        raise ValueError(f"{path}: permission denied") from None
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ValueError(f"{path}: is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path}: not a regular file")
        if st.st_size > MAX_CONFIG_SIZE:
            raise ValueError(f"{path}: larger than {MAX_CONFIG_SIZE >> 20} MiB")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_CONFIG_SIZE and (chunk := os.read(fd, MAX_CONFIG_SIZE + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if size > MAX_CONFIG_SIZE:
        raise ValueError(f"{path}: larger than {MAX_CONFIG_SIZE >> 20} MiB")
    return b"".join(chunks)


def load(path: str | None = None) -> EngineSettings:
    """Settings from the config file (``$TOKENLIFE_CONFIG`` or the default path).

    A missing default file gives the defaults.  Raises ValueError with a
    one-line reason for anything else that is wrong.
    """
    explicit = path is not None or bool(os.environ.get(ENV_VAR))
    path = path or os.environ.get(ENV_VAR) or DEFAULT_CONFIG
    try:
        raw = read_config(path)
    except FileNotFoundError:
        if explicit:
            raise ValueError(f"{path}: no such file") from None
        return EngineSettings()
    # Most of the file is for the token host: parse it only if it says [engine].
    if b"engine" not in raw:
        return EngineSettings()
    import tomllib

    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: invalid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses once per nested array or table
        raise ValueError(f"{path}: invalid TOML: nested too deeply") from None
    try:
        return parse(data.get("engine", {}))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
