"""Pulling the user's current token from the token host, authenticated by munge.

The worker side of producer/pull.py (the protocol is described there and in
docs/pull.md).  The standard library and tokenlife/munge.py only, imported
only when a pull is wanted: the engine stays light on every task's path.

* :func:`pull` asks once (retrying a busy or unreachable server, and the
  next address of a comma-separated list, until ``timeout``): it makes a
  munge credential as the calling user, sends it, and opens the reply, a
  munge credential that only this uid can decode.  It returns the token
  text, or raises :class:`PullError` with one line.
* :func:`pull_into` keeps the pulled token at ``<token_dir>/<uid>/slurm_jwt``
  under transfer's rules: mode 0600, owned by the user, replaced atomically
  (tokenlife.fsutil.write_secret), the token's ``iat`` as its mtime, never
  an older token over a newer one.  A per-user lock (``.pull.lock`` in the
  user's directory, which holds the time and outcome of the last pull)
  makes a thousand tasks of one user on one node cost one pull: the others
  wait for it and read the fresh file, and for ``min_interval`` seconds after
  a failed pull nobody asks again (after one that worked: a tenth of the
  token's lifetime at most, see ``_pause``).  Run as root for another uid (a Prolog), it
  creates the user's directory and pulls as the user in a child process.
  :func:`fetch_into` is the same, and also says why a pull failed when a
  still-valid token was kept (client_engine.fallback tells the task).

libmunge is called in process through tokenlife/munge.py (the munge command
would cost a fork and an exec).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import sys
import time

from client_engine.tokens import Refused, Token, check, delivered_path, load, parse, user_dir
from tokenlife.munge import (
    EMUNGE_CRED_EXPIRED,
    EMUNGE_CRED_INVALID,
    EMUNGE_CRED_REPLAYED,
    EMUNGE_CRED_UNAUTHORIZED,
    LIBRARY,
    Munge,
    MungeError,
)

# typing, secrets, random and pathlib cost milliseconds at every start (the
# engine runs once per task): none of them is imported here.

PROTOCOL = b"tokenlife-pull"
VERSION = b"1"
#: a reply is a munge credential around a token: a few KiB at most
MAX_REPLY = 65536
#: the lock (and last-pull stamp) in the user's directory
LOCK_NAME = ".pull.lock"
#: results the server may answer that are worth asking again (or another server)
RETRY = frozenset({"busy", "error", "timeout", "unreachable"})


class PullError(Refused):
    """A pull failed; ``result`` names how (the server's result, or
    ``unreachable``, ``munge``, ``bad_reply``), the message says it in one line."""

    def __init__(self, result: str, message: str) -> None:
        super().__init__(message)
        self.result = result


# -- libmunge -------------------------------------------------------------------


class _Munge:
    """The engine's two calls to libmunge (tokenlife/munge.py), shaped for a pull."""

    @staticmethod
    def encode(payload: bytes, sock: str | None, uid: int | None, ttl: int) -> bytes:
        try:
            return Munge(sock).encode(payload, uid_restriction=uid, ttl=ttl).encode("ascii")
        except MungeError as exc:
            if exc.code < 0:  # libmunge itself is missing
                raise PullError("munge", f"cannot load {LIBRARY}: is munge installed?") from None
            raise PullError("munge", f"munge cannot make a credential: {exc.message}") from None

    @staticmethod
    def decode(cred: bytes, sock: str | None) -> tuple[int, bytes, int, str]:
        """(error, payload, encoder's uid, message); error 0 is success."""
        try:
            found = Munge(sock).decode(cred)
        except MungeError as exc:
            return exc.code, b"", exc.uid or 0, exc.message
        return 0, found.payload, found.uid, ""


# -- one pull -------------------------------------------------------------------


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``; PullError if not."""
    host, sep, port = address.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise PullError("usage", f"{address.strip()[:80]!r} is not HOST:PORT")
    return host, int(port)


def pull(
    address: str,
    socket_path: str | None = None,
    timeout: float = 10.0,
    *,
    server_uid: int | None = None,
    ttl: int = 60,
    source: str | None = None,
) -> str:
    """The calling user's current token from the pull service at ``address``.

    ``address``: ``HOST:PORT``, or several separated by commas (tried in
    turn).  ``socket_path``: this node's munged socket (None: libmunge's
    default).  ``server_uid``: when set, the request can be decoded only by
    that uid and a reply made by any other uid is refused (a fake server on
    the port cannot hand out tokens).  ``source``: the local address to
    connect from.  Retries a busy or unreachable server with backoff until
    ``timeout``; PullError otherwise.
    """
    targets = [parse_address(a) for a in address.split(",") if a.strip()]
    if not targets:
        raise PullError("usage", "no pull address")
    deadline = time.monotonic() + timeout
    delay = 0.02
    last: PullError | None = None
    while True:
        for host, port in targets:
            if time.monotonic() >= deadline:
                break
            try:
                return _pull_once(host, port, socket_path, deadline, server_uid, ttl, source)
            except PullError as exc:
                if exc.result not in RETRY:
                    raise
                last = exc
        left = deadline - time.monotonic()
        if left <= 0:
            break
        jitter = 0.5 + os.urandom(1)[0] / 255  # 0.5 to 1.5: callers that met spread apart
        time.sleep(min(left, delay * jitter))
        delay = min(delay * 2, 1.0)
    raise last or PullError("unreachable", f"pull from {address}: timed out after {timeout:g}s")


def _pull_once(
    host: str,
    port: int,
    socket_path: str | None,
    deadline: float,
    server_uid: int | None,
    ttl: int,
    source: str | None,
) -> str:
    where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    nonce = os.urandom(16).hex().encode()  # not secret: it ties the reply to this request
    cred = _Munge.encode(b" ".join((PROTOCOL, VERSION, nonce)), socket_path, server_uid, ttl)
    try:
        line = _exchange(host, port, cred, deadline, source)
    except TimeoutError:
        raise PullError("unreachable", f"pull from {where}: timed out") from None
    except OSError as exc:
        raise PullError("unreachable", f"pull from {where}: {exc.strerror or exc}") from None
    status, _, rest = line.partition(b" ")
    if status == b"ERR":
        result, _, said = rest.partition(b" ")
        shown = said.decode("ascii", "replace")[:200]
        raise PullError(result.decode("ascii", "replace")[:32], f"pull from {where}: {shown}")
    if status != b"OK" or not rest:
        raise PullError("bad_reply", f"pull from {where}: not a pull service reply")
    err, payload, uid, message = _Munge.decode(rest, socket_path)
    if err:
        raise PullError("bad_reply", f"pull from {where}: reply refused: {_why(err, message)}")
    if server_uid is not None and uid != server_uid:
        raise PullError(
            "bad_reply", f"pull from {where}: reply made by uid {uid}, not the service's"
        )
    parts = payload.split(b" ")
    if len(parts) != 4 or parts[:3] != [PROTOCOL, VERSION, nonce] or not parts[3]:
        raise PullError("bad_reply", f"pull from {where}: reply does not answer this request")
    try:
        return parts[3].decode("ascii")
    except UnicodeDecodeError:
        raise PullError("bad_reply", f"pull from {where}: reply holds no token") from None


def _why(err: int, message: str) -> str:
    if err == EMUNGE_CRED_UNAUTHORIZED:
        return "it is for another uid"
    if err == EMUNGE_CRED_INVALID:
        return "made with another munge key"
    if err in (EMUNGE_CRED_EXPIRED, EMUNGE_CRED_REPLAYED):
        return message.lower()
    return message


def _exchange(host: str, port: int, cred: bytes, deadline: float, source: str | None) -> bytes:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    bind = (source, 0) if source else None
    with socket.create_connection((host, port), timeout=left, source_address=bind) as sock:
        sock.sendall(cred + b"\n")
        buf = bytearray()
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            chunk = sock.recv(MAX_REPLY + 1 - len(buf))
            if not chunk:
                break
            buf += chunk
            if len(buf) > MAX_REPLY:
                raise PullError("bad_reply", f"pull from {host}:{port}: reply too long")
    return bytes(buf).split(b"\n", 1)[0].rstrip(b"\r")


# -- keeping it in the user's directory -------------------------------------------


def pull_into(
    token_dir: str,
    uid: int,
    user: str,
    address: str,
    socket_path: str | None = None,
    timeout: float = 10.0,
    *,
    min_remaining: float = 0.0,
    min_interval: float = 30.0,
    server_uid: int | None = None,
) -> Token:
    """The user's token at ``<token_dir>/<uid>/slurm_jwt``, pulled if needed.

    Pulls only when the file there is missing, unusable, or valid for less
    than ``min_remaining`` more seconds, and nobody pulled for this user in
    the last ``min_interval`` seconds.  Returns the token the file holds
    afterwards (a pull that fails leaves a still-valid file in place and
    returns it); Refused or PullError if there is no valid token.
    """
    return fetch_into(
        token_dir, uid, user, address, socket_path, timeout,
        min_remaining=min_remaining, min_interval=min_interval, server_uid=server_uid,
    )[0]  # fmt: skip


def fetch_into(
    token_dir: str,
    uid: int,
    user: str,
    address: str,
    socket_path: str | None = None,
    timeout: float = 10.0,
    *,
    min_remaining: float = 0.0,
    min_interval: float = 30.0,
    server_uid: int | None = None,
) -> tuple[Token, PullError | None]:
    """:func:`pull_into`, also saying why the pull failed when a still-valid
    token was kept (the engine tells the task); None when no pull was due or
    it worked (which may have brought no newer token)."""
    if os.geteuid() == 0 and uid != 0:
        return _pull_as_user(
            token_dir, uid, user, address, socket_path, timeout,
            min_remaining, min_interval, server_uid,
        )  # fmt: skip
    deadline = time.monotonic() + timeout
    directory = user_dir(token_dir, uid)
    path = delivered_path(token_dir, uid)
    _check_dir(directory, uid)
    before = _usable(path, uid, user)
    if before is not None and before.exp - time.time() > min_remaining:
        return before, None
    fd = _open_lock(directory)
    try:
        _lock(fd, deadline, directory)
        now = time.time()
        current = _usable(path, uid, user)
        if current is not None and (
            current.exp - now > min_remaining or before is None or current.iat > before.iat
        ):
            return current, None  # fresh enough, or just brought by another pull (or push)
        last_at, last_result = _read_stamp(fd)
        pause = _pause(min_interval, last_result, current)
        # a stamp a little ahead (a clock stepped back, its rounding) still counts
        if pause > 0 and last_at is not None and -5.0 < now - last_at < pause:
            ago, wait = int(now - last_at), int(pause - (now - last_at)) + 1
            said = f"the pull {ago}s ago said {last_result}; next try in {wait}s"
            if current is not None:
                kept = None if last_result == "ok" else PullError(last_result or "error", said)
                return current, kept
            raise PullError(last_result or "error", f"no token: {said}")
        left = max(0.1, deadline - time.monotonic())
        try:
            text = pull(address, socket_path, left, server_uid=server_uid)
        except PullError as exc:
            _write_stamp(fd, now, exc.result)
            if current is not None:
                return current, exc
            raise
        _write_stamp(fd, now, "ok")
        token = check(parse(text, path), user, time.time())
        return _install(path, text, token, uid, user), None
    finally:
        os.close(fd)


#: after a pull that worked, the next waits this share of the token's lifetime at most
OK_PAUSE_SHARE = 0.1


def _pause(min_interval: float, last_result: str, current: Token | None) -> float:
    """How long after the last pull nobody asks again.

    A failure holds for ``min_interval``: asking sooner would not change the
    answer, and a thousand tasks must not ask a thousand times.  After a pull
    that worked, asking again soon only brings the same token, unless that
    token is short-lived: then the pause is a tenth of its lifetime (a
    10-second token must not wait 30 s for its successor), and none once it
    has expired (the token host may have renewed it since).
    """
    if last_result != "ok":
        return min_interval
    if current is None:
        return 0.0
    return min(min_interval, OK_PAUSE_SHARE * max(0, current.exp - current.iat))


def _install(path: str, text: str, token: Token, uid: int, user: str) -> Token:
    """Put ``token`` at ``path`` unless a token issued later is already there."""
    from pathlib import Path

    from tokenlife.fsutil import write_secret

    there = _usable(path, uid, user)
    if there is not None and there.iat >= token.iat:
        return there  # never an older token over a newer one (a tie: it is this one)
    write_secret(Path(path), text.encode("ascii"))
    # transfer orders a user's tokens on a node by mtime = iat: keep to it
    os.utime(path, (token.iat, token.iat), follow_symlinks=False)
    return token


def _usable(path: str, uid: int, user: str) -> Token | None:
    try:
        return load(path, uid, user, time.time())
    except Refused:
        return None


def _check_dir(directory: str, uid: int) -> None:
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        raise Refused(
            f"{directory}: missing (root creates it: transfer, or the Prolog's pull)"
        ) from None
    except OSError as exc:
        raise Refused(f"{directory}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise Refused(f"{directory}: not a directory, refused")
    if st.st_uid != uid or st.st_mode & 0o022:
        raise Refused(f"{directory}: must be owned by uid {uid} and writable by it alone")


def _open_lock(directory: str) -> int:
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(f"{directory}/{LOCK_NAME}", flags, 0o600)
    except OSError as exc:
        raise Refused(f"{directory}/{LOCK_NAME}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Refused(f"{directory}/{LOCK_NAME}: not a regular file")
    return fd


def _lock(fd: int, deadline: float, directory: str) -> None:
    delay = 0.005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise Refused(f"{directory}/{LOCK_NAME}: {exc.strerror}") from None
        left = deadline - time.monotonic()
        if left <= 0:
            raise PullError("busy", f"{directory}: another pull for this user takes too long")
        time.sleep(min(left, delay))
        delay = min(delay * 2, 0.1)


def _read_stamp(fd: int) -> tuple[float | None, str]:
    try:
        data = os.pread(fd, 128, 0).decode("ascii").split()
        return float(data[0]), data[1][:32]
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return None, ""


def _write_stamp(fd: int, at: float, result: str) -> None:
    try:
        line = f"{at:.3f} {result}\n".encode("ascii")
        os.ftruncate(fd, 0)
        os.pwrite(fd, line, 0)
    except OSError:
        pass  # only an optimisation: the next caller pulls again


def _pull_as_user(
    token_dir: str,
    uid: int,
    user: str,
    address: str,
    socket_path: str | None,
    timeout: float,
    min_remaining: float,
    min_interval: float,
    server_uid: int | None,
) -> tuple[Token, PullError | None]:
    """Root (a Prolog) pulling for a job's user: munge must vouch for the user,
    so the pull runs in a child with the user's identity."""
    import pwd
    from pathlib import Path

    from tokenlife.errors import TokenlifeError
    from tokenlife.fsutil import ensure_dir, ensure_private_dir

    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        raise Refused(f"uid {uid} is not in the user database") from None
    if pw.pw_name != user:
        raise Refused(f"uid {uid} is {pw.pw_name}, not {user}")
    try:
        ensure_dir(Path(token_dir), 0o755)
        ensure_private_dir(Path(user_dir(token_dir, uid)), uid, pw.pw_gid)
    except TokenlifeError as exc:
        raise Refused(str(exc)) from None
    except OSError as exc:
        raise Refused(f"{user_dir(token_dir, uid)}: {exc.strerror or exc}") from None
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become the user, pull, say how it went
        status = 1
        try:
            os.close(read_end)
            os.setgroups(os.getgrouplist(pw.pw_name, pw.pw_gid))
            os.setgid(pw.pw_gid)
            os.setuid(uid)
            try:
                _, kept = fetch_into(
                    token_dir, uid, user, address, socket_path, timeout,
                    min_remaining=min_remaining, min_interval=min_interval,
                    server_uid=server_uid,
                )  # fmt: skip
                status = 0
                if kept is not None:  # a still-valid token, and why no newer one came
                    os.write(write_end, f"{kept.result}\n{kept}".encode(errors="replace")[:1024])
            except PullError as exc:
                os.write(write_end, f"{exc.result}\n{exc}".encode(errors="replace")[:1024])
            except Refused as exc:
                os.write(write_end, f"refused\n{exc}".encode(errors="replace")[:1024])
        except BaseException as exc:
            with_type = f"error\ninternal error ({type(exc).__name__})"
            os.write(write_end, with_type.encode())
        finally:
            os._exit(status)
    os.close(write_end)
    try:
        said = b""
        while chunk := os.read(read_end, 1024):
            said += chunk
    finally:
        os.close(read_end)
    _, status = os.waitpid(pid, 0)
    result, _, message = said.decode(errors="replace").partition("\n")
    token = _usable(delivered_path(token_dir, uid), uid, user)
    if token is not None:
        return token, PullError(result, message) if result else None
    if os.waitstatus_to_exitcode(status) == 0 or not result:
        raise Refused(f"{delivered_path(token_dir, uid)}: no valid token after the pull")
    if result == "refused":
        raise Refused(message)
    raise PullError(result, message)


# -- python -m client_engine.pull (tests, benchmarks, the curious) -------------------

USAGE = """\
usage: python -m client_engine.pull [--socket PATH] [--timeout S] [--server-uid UID]
                                    [--source ADDR] [--token-dir DIR [--min-remaining S]]
                                    ADDRESS
Pulls the caller's token from the tokenlife pull service at ADDRESS (HOST:PORT[,...]),
with this node's munged (--socket; default libmunge's), connecting from ADDR if given.
Without --token-dir the token is printed; with it, kept in DIR/<uid>/slurm_jwt
(its path is printed). Exit status: 0 success, 1 refused or failed, 2 usage.
"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    options: dict[str, str] = {}
    known = ("--socket", "--timeout", "--server-uid", "--source", "--token-dir", "--min-remaining")
    while args and args[0].startswith("--"):
        flag, eq, value = args.pop(0).partition("=")
        if flag not in known:
            sys.stderr.write(USAGE)
            return 2
        if not eq:
            if not args:
                sys.stderr.write(USAGE)
                return 2
            value = args.pop(0)
        options[flag] = value
    if len(args) != 1:
        sys.stderr.write(USAGE)
        return 2
    try:
        timeout = float(options.get("--timeout", "10"))
        server_uid = int(options["--server-uid"]) if "--server-uid" in options else None
        min_remaining = float(options.get("--min-remaining", "0"))
    except ValueError:
        sys.stderr.write(USAGE)
        return 2
    sock = options.get("--socket")
    try:
        if "--token-dir" in options:
            import pwd

            uid = os.getuid()
            user = pwd.getpwuid(uid).pw_name
            token = pull_into(
                options["--token-dir"], uid, user, args[0], sock, timeout,
                min_remaining=min_remaining, server_uid=server_uid,
            )  # fmt: skip
            print(f"{token.source} exp={token.exp} iat={token.iat}")
        else:
            source = options.get("--source")
            print(pull(args[0], sock, timeout, server_uid=server_uid, source=source))
    except Refused as exc:
        print(f"tokenlife pull: {exc}", file=sys.stderr)
        return 1
    except KeyError:
        print(f"tokenlife pull: uid {os.getuid()} is not in the user database", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
