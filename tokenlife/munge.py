"""MUNGE credentials: libmunge, in process, through ctypes.

The pull service (producer/pull.py) decodes its callers' credentials and
seals its replies with it; the worker engine (client_engine/pull.py) makes
its requests and opens the replies with it.  It imports only the standard
library's lightest modules (no dataclasses, no threading): the engine runs
once per task, and pulls through this module.

Why ctypes and not something else:

* The ``munge``/``unmunge`` commands cost a fork and an exec per credential,
  and the pull server makes two per request (decode the caller's, encode the
  reply): under a thousand near-simultaneous pulls that is two thousand
  processes on the token host.  A libmunge call is one round trip on munged's
  Unix socket, made from the calling thread, which ctypes lets run without
  the GIL.
* The one binding on PyPI, ``pymunge`` (0.1.3, February 2018, no release
  since), is itself a ctypes wrapper, untyped and unmaintained: a dependency
  that brings nothing this ~150-line module does not, and that ``mypy
  --strict`` cannot check.
* libmunge's ABI has been stable since 0.5 (``libmunge.so.2``, Debian's
  ``libmunge2``, installed with the ``munge`` package that every Slurm node
  already has).  The numbers below are ``munge.h``'s enums, which have not
  changed since 0.5; a test compares the error numbers with
  ``munge_strerror``.

Every call makes its own ``munge_ctx_t`` (a small malloc): contexts are not
thread-safe, and one per call lets any thread encode or decode at any time.
"""

from __future__ import annotations

import _thread
import ctypes
import socket

TYPE_CHECKING = False  # typing costs milliseconds at every engine start
if TYPE_CHECKING:
    from typing import Any

#: the library's soname: Debian's libmunge2, and every MUNGE 0.5.x build
LIBRARY = "libmunge.so.2"

# munge_opt_t (munge.h)
OPT_TTL = 4
OPT_ADDR4 = 5
OPT_ENCODE_TIME = 6
OPT_SOCKET = 8
OPT_UID_RESTRICTION = 9

# munge_err_t (munge.h)
EMUNGE_SUCCESS = 0
EMUNGE_SNAFU = 1
EMUNGE_BAD_ARG = 2
EMUNGE_BAD_LENGTH = 3
EMUNGE_OVERFLOW = 4
EMUNGE_NO_MEMORY = 5
EMUNGE_SOCKET = 6
EMUNGE_TIMEOUT = 7
EMUNGE_BAD_CRED = 8
EMUNGE_BAD_VERSION = 9
EMUNGE_BAD_CIPHER = 10
EMUNGE_BAD_MAC = 11
EMUNGE_BAD_ZIP = 12
EMUNGE_BAD_REALM = 13
EMUNGE_CRED_INVALID = 14
EMUNGE_CRED_EXPIRED = 15
EMUNGE_CRED_REWOUND = 16
EMUNGE_CRED_REPLAYED = 17
EMUNGE_CRED_UNAUTHORIZED = 18

#: the credential was well formed and made with our key, but is not good now
#: (munge still says whose it was: useful for the audit trail)
DECODED_BUT_REFUSED = frozenset({EMUNGE_CRED_EXPIRED, EMUNGE_CRED_REWOUND, EMUNGE_CRED_REPLAYED})
#: munged could not be asked (down, overloaded): the caller did nothing wrong
LOCAL_TROUBLE = frozenset(
    {EMUNGE_SNAFU, EMUNGE_NO_MEMORY, EMUNGE_SOCKET, EMUNGE_TIMEOUT, EMUNGE_OVERFLOW}
)

#: a credential is base64 of at most a few KiB: refuse anything bigger unread
MAX_CREDENTIAL = 65536


class MungeError(Exception):
    """A libmunge call failed; ``code`` is the munge_err_t (-1: no library).

    For a credential that munged decoded but refused (expired, rewound,
    replayed), ``uid`` is whose it was; otherwise None.
    """

    def __init__(self, code: int, message: str, uid: int | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.uid = code, message, uid

    def __str__(self) -> str:
        return f"munge: {self.message}"


class Credential:
    """What munged vouches for in a decoded credential.

    ``origin``: the IPv4 address of the host whose munged encoded it (dotted
    quad; "0.0.0.0" when that munged could not tell its own address).
    (A plain class: a dataclass would import ``inspect``, 14 ms at every
    engine start.)
    """

    __slots__ = ("encoded_at", "gid", "origin", "payload", "ttl", "uid")

    def __init__(
        self, payload: bytes, uid: int, gid: int, origin: str, encoded_at: int, ttl: int
    ) -> None:
        self.payload, self.uid, self.gid = payload, uid, gid
        self.origin, self.encoded_at, self.ttl = origin, encoded_at, ttl

    def _fields(self) -> tuple[bytes, int, int, str, int, int]:
        return (self.payload, self.uid, self.gid, self.origin, self.encoded_at, self.ttl)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Credential) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:  # the payload may hold a token: never shown
        return (
            f"Credential(uid={self.uid}, gid={self.gid}, origin={self.origin!r}, "
            f"encoded_at={self.encoded_at}, ttl={self.ttl}, payload=<{len(self.payload)} bytes>)"
        )


class _Lib:
    def __init__(self, path: str) -> None:
        # The context calls are a few instructions each: called with the GIL
        # held (PyDLL), since releasing and taking it back costs more than the
        # call, and under load every take-back waits behind the other threads.
        # Only encode and decode, which wait on munged, let other threads run.
        lib = ctypes.PyDLL(path)
        blocking = ctypes.CDLL(path, use_errno=True)
        self.ctx_create = lib.munge_ctx_create
        self.ctx_create.restype = ctypes.c_void_p
        self.ctx_create.argtypes = []
        self.ctx_destroy = lib.munge_ctx_destroy
        self.ctx_destroy.restype = None
        self.ctx_destroy.argtypes = [ctypes.c_void_p]
        # munge_ctx_set/get are variadic: no argtypes, every argument passed typed
        self.ctx_set = lib.munge_ctx_set
        self.ctx_set.restype = ctypes.c_int
        self.ctx_get = lib.munge_ctx_get
        self.ctx_get.restype = ctypes.c_int
        self.ctx_strerror = lib.munge_ctx_strerror
        self.ctx_strerror.restype = ctypes.c_char_p
        self.ctx_strerror.argtypes = [ctypes.c_void_p]
        self.strerror = lib.munge_strerror
        self.strerror.restype = ctypes.c_char_p
        self.strerror.argtypes = [ctypes.c_int]
        self.encode = blocking.munge_encode
        self.encode.restype = ctypes.c_int
        self.encode.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_int,
        ]
        self.decode = blocking.munge_decode
        self.decode.restype = ctypes.c_int
        self.decode.argtypes = [
            ctypes.c_char_p,
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_int),
            ctypes.POINTER(ctypes.c_uint32),
            ctypes.POINTER(ctypes.c_uint32),
        ]
        # libmunge hands out malloc()ed buffers: free them with the C library's free
        self.free = ctypes.PyDLL(None).free
        self.free.restype = None
        self.free.argtypes = [ctypes.c_void_p]


_loaded: dict[str, _Lib] = {}
_load_lock = _thread.allocate_lock()


def _lib(path: str = LIBRARY) -> _Lib:
    with _load_lock:
        lib = _loaded.get(path)
        if lib is None:
            try:
                lib = _Lib(path)
            except (OSError, AttributeError) as exc:
                raise MungeError(-1, f"cannot load {path}: {exc}") from None
            _loaded[path] = lib
        return lib


def available(library: str = LIBRARY) -> bool:
    """Whether libmunge can be loaded here (munged may still be down)."""
    try:
        _lib(library)
    except MungeError:
        return False
    return True


def strerror(code: int, library: str = LIBRARY) -> str:
    text = _lib(library).strerror(code)
    return text.decode("ascii", "replace") if text else f"munge error {code}"


class Munge:
    """Encode and decode credentials through the munged at ``socket``
    (None: libmunge's default, /run/munge/munge.socket.2).  Thread-safe."""

    def __init__(self, socket: str | None = None, library: str = LIBRARY) -> None:
        self.socket = socket
        self._lib = _lib(library)

    def __repr__(self) -> str:
        return f"Munge(socket={self.socket!r})"

    def _context(self) -> int:
        ctx = self._lib.ctx_create()
        if not ctx:
            raise MungeError(EMUNGE_NO_MEMORY, "cannot create a munge context")
        if self.socket is not None:
            self._set(ctx, OPT_SOCKET, ctypes.c_char_p(self.socket.encode()))
        return int(ctx)

    def _set(self, ctx: int, option: int, value: ctypes.c_int | ctypes.c_char_p) -> None:
        err = int(self._lib.ctx_set(ctypes.c_void_p(ctx), ctypes.c_int(option), value))
        if err != EMUNGE_SUCCESS:
            self._lib.ctx_destroy(ctx)
            raise MungeError(err, f"cannot set option {option}: {strerror(err)}")

    def _error(self, err: int, ctx: int, uid: int | None = None) -> MungeError:
        text = self._lib.ctx_strerror(ctx)
        message = text.decode("ascii", "replace") if text else strerror(err)
        return MungeError(err, message, uid)

    def encode(
        self, payload: bytes, *, uid_restriction: int | None = None, ttl: int | None = None
    ) -> str:
        """A credential for the calling process's uid and gid, carrying ``payload``.

        ``uid_restriction``: only a process of that uid may decode it.
        ``ttl``: seconds it stays valid (None: munged's default, 300 s;
        munged caps it at its --max-ttl).
        """
        ctx = self._context()
        try:
            if uid_restriction is not None:
                self._set(ctx, OPT_UID_RESTRICTION, ctypes.c_int(uid_restriction))
            if ttl is not None:
                self._set(ctx, OPT_TTL, ctypes.c_int(ttl))
            out = ctypes.c_void_p()
            err = int(self._lib.encode(ctypes.byref(out), ctx, payload, len(payload)))
            try:
                if err != EMUNGE_SUCCESS:
                    raise self._error(err, ctx)
                if not out.value:
                    raise MungeError(EMUNGE_SNAFU, "munge_encode returned no credential")
                return ctypes.string_at(out.value).decode("ascii")
            finally:
                if out.value:
                    self._lib.free(out.value)
        finally:
            self._lib.ctx_destroy(ctx)

    def decode(self, credential: str | bytes) -> Credential:
        """The credential's contents, as vouched for by munged; MungeError if refused.

        munged refuses a credential made with another key (EMUNGE_CRED_INVALID),
        one past its TTL (EMUNGE_CRED_EXPIRED), one it has decoded before
        (EMUNGE_CRED_REPLAYED) and one restricted to another uid
        (EMUNGE_CRED_UNAUTHORIZED).
        """
        raw = credential.encode("ascii") if isinstance(credential, str) else credential
        if len(raw) > MAX_CREDENTIAL or b"\0" in raw:
            raise MungeError(EMUNGE_BAD_CRED, "Invalid credential format")
        ctx = self._context()
        try:
            buf = ctypes.c_void_p()
            length = ctypes.c_int(0)
            uid = ctypes.c_uint32(0)
            gid = ctypes.c_uint32(0)
            err = int(
                self._lib.decode(
                    raw,
                    ctx,
                    ctypes.byref(buf),
                    ctypes.byref(length),
                    ctypes.byref(uid),
                    ctypes.byref(gid),
                )
            )
            try:
                payload = ctypes.string_at(buf.value, length.value) if buf.value else b""
            finally:
                if buf.value:
                    self._lib.free(buf.value)
            if err != EMUNGE_SUCCESS:
                whose = int(uid.value) if err in DECODED_BUT_REFUSED else None
                raise self._error(err, ctx, whose)
            addr = (ctypes.c_uint8 * 4)()
            encoded_at = ctypes.c_long(0)
            ttl = ctypes.c_int(0)
            self._get(ctx, OPT_ADDR4, addr)
            self._get(ctx, OPT_ENCODE_TIME, encoded_at)
            self._get(ctx, OPT_TTL, ttl)
            return Credential(
                payload=payload,
                uid=int(uid.value),
                gid=int(gid.value),
                origin=socket.inet_ntoa(bytes(addr)),
                encoded_at=int(encoded_at.value),
                ttl=int(ttl.value),
            )
        finally:
            self._lib.ctx_destroy(ctx)

    def _get(self, ctx: int, option: int, out: Any) -> None:
        err = int(self._lib.ctx_get(ctypes.c_void_p(ctx), ctypes.c_int(option), ctypes.byref(out)))
        if err != EMUNGE_SUCCESS:
            raise MungeError(err, f"cannot read option {option}: {strerror(err)}")
