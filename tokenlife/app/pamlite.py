"""The PAM fallback's common case, with modules built into the interpreter only.

When no mint service answers, ``tokenlife pam`` loads the configuration and
the minting stack (tokenlife.app.site): tomllib, json, re, dataclasses,
logging and pathlib alone cost ~50 ms per login on a 2-core VM, a quarter of
an ssh login.  Most logins, though, find the user's token still good and its
file in place, and then the full path changes nothing.  :func:`in_place`
answers exactly that question, reading what the full path reads and deciding
as it decides (producer.mint.Minter.reusable, producer.loginfile), and it
writes nothing.  Whatever else it meets -- a token to mint, a file to write
or repair, a setting or a TOML form it does not know, an error -- it answers
False and the caller takes the full path, which decides and reports as ever.

Read from the configuration: tables of ``key = value`` lines whose values
are plain strings, integers, decimals, booleans or one-line arrays of those
(the form ``tokenlife config sample`` writes); the tables a login uses
([key] with a file HS256 key, [token], [producer], [pam], [store], [login])
are checked as tokenlife.config checks them.  [delivery], [engine],
[pull], [serve] and the [[service]] entries belong to the daemons and are
not read here.
"""

from __future__ import annotations

import _json
import _operator
import binascii
import os
import pwd
import stat
import sys
import time

from tokenlife.durations import parse_duration

# typing costs milliseconds at run time: only the type checker reads it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: TOML's bare keys
_BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_DIGITS = frozenset("0123456789")
#: tokenlife.users: portable user names, not starting with '-' or '.'
_NAME_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_NAME_REST = _NAME_FIRST | {".", "-"}
#: tokenlife.slurm_jwt's token alphabet and size limit
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
_MAX_TOKEN = 65536
_MAX_DEPTH = 32
_MAX_FILE = 1 << 20

DEFAULT_CONFIG = "/etc/tokenlife/tokenlife.toml"
ENV_VAR = "TOKENLIFE_CONFIG"
#: per table the login reads: the keys checked here; any other key (kid, the
#: aws keys, a plugin's table) sends the login down the full path
READ_KEYS = {
    "key": frozenset({"source", "path", "algorithm", "owners", "cache_path", "refresh"}),
    "token": frozenset(
        {"lifetime", "renew_until", "renew_before", "renew_fraction", "kind", "sinks"}
    ),
    "producer": frozenset({"slurm_user", "allow_privileged_users", "admins", "socket"}),
    "pam": frozenset({"required", "min_uid"}),
    "store": frozenset({"url", "spool_dir", "purge_after"}),
    "login": frozenset({"token_dir"}),
}
#: the daemons' tables, not read on the login path (as tokenlife.config.Config names them)
NOT_READ = frozenset({"delivery", "engine", "pull", "serve", "services"})
#: the arrays of tables in the subset (their TOML name: Config's name), the daemons' too
_ARRAYS = {"service": "services"}

_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class Unsure(Exception):
    """Not the common case: the full path decides."""


# -- the configuration ------------------------------------------------------------------------


def parse_toml(text: str) -> dict[str, Any]:
    """``text`` as tomllib.loads reads it, if it is in the subset; Unsure otherwise."""
    # Control characters, CR and other invisible characters: not in the subset.
    if not text.replace("\t", " ").replace("\n", " ").isprintable():
        raise Unsure("character outside the subset")
    root: dict[str, Any] = {}
    table = root
    for raw in text.split("\n"):
        line = raw.strip(" \t")
        if not line or line[0] == "#":
            continue
        if line[0] == "[":
            table = _header(root, line)
            continue
        eq = line.find("=")
        if eq < 0:
            raise Unsure("not key = value")
        key = _bare(line[:eq].rstrip(" \t"))
        value, rest = _value(line[eq + 1 :].lstrip(" \t"))
        if key in table or not _blank(rest):
            raise Unsure("duplicate key or text after the value")
        table[key] = value
    return root


def _header(root: dict[str, Any], line: str) -> dict[str, Any]:
    if line.startswith("[["):  # [[service]] only: one more element of its array
        end = line.find("]]")
        name = line[2:end].strip(" \t") if end > 0 else ""
        if name not in _ARRAYS or not _blank(line[end + 2 :]):
            raise Unsure("an array of tables other than [[service]]")
        array = root.setdefault(name, [])
        if not isinstance(array, list):
            raise Unsure("a table used as an array")
        element: dict[str, Any] = {}
        array.append(element)
        return element
    end = line.find("]")
    if end < 0 or not _blank(line[end + 1 :]):
        raise Unsure("not a plain table header")
    *parents, last = [_bare(part.strip(" \t")) for part in line[1:end].split(".")]
    table = root
    for name in parents:
        table = table.setdefault(name, {})
        if not isinstance(table, dict):
            raise Unsure("a value used as a table")
    # Defined before, or implied by an earlier [last.sub]: tomllib's rules
    # for those are not repeated here.
    if last in table:
        raise Unsure("table defined twice")
    new: dict[str, Any] = {}
    table[last] = new
    return new


def _bare(name: str) -> str:
    if not name or not set(name) <= _BARE:
        raise Unsure("not a bare key")
    return name


def _blank(rest: str) -> bool:
    rest = rest.lstrip(" \t")
    return not rest or rest[0] == "#"


def _value(text: str) -> tuple[Any, str]:
    """One value at the start of ``text``, and the text after it."""
    first = text[:1]
    if first in ('"', "'"):
        end = text.find(first, 1)
        body = text[1:end]
        # Multi-line strings and escapes are not in the subset.
        if text.startswith(first * 3) or end < 0 or (first == '"' and "\\" in body):
            raise Unsure("not a plain string")
        return body, text[end + 1 :]
    if first == "[":
        return _array(text[1:])
    end = 0
    while end < len(text) and text[end] not in " \t,]#":
        end += 1
    word, rest = text[:end], text[end:]
    if word in ("true", "false"):
        return word == "true", rest
    return _number(word), rest


def _number(word: str) -> int | float:
    digits = word[1:] if word[:1] in ("+", "-") else word
    whole, dot, fraction = digits.partition(".")
    # No underscores, exponents, bases, leading zeros, inf or nan.
    if not whole or not set(whole) <= _DIGITS or (len(whole) > 1 and whole[0] == "0"):
        raise Unsure("not a plain number")
    if not dot:
        return int(word)
    if not fraction or not set(fraction) <= _DIGITS:
        raise Unsure("not a plain number")
    return float(word)


def _array(text: str) -> tuple[list[Any], str]:
    """A one-line array of plain values; ``text`` follows its ``[``."""
    items: list[Any] = []
    rest = text
    while True:
        rest = rest.lstrip(" \t")
        if rest[:1] == "]":
            return items, rest[1:]
        # Nested arrays, inline tables, comments and line ends inside: not in the subset.
        if rest[:1] in ("[", "{", "#", ""):
            raise Unsure("not a one-line array of plain values")
        value, rest = _value(rest)
        items.append(value)
        rest = rest.lstrip(" \t")
        if rest[:1] == ",":
            rest = rest[1:]
        elif rest[:1] != "]":
            raise Unsure("not a one-line array of plain values")


class Settings:
    """What a login needs from the configuration, checked as tokenlife.config checks it."""

    __slots__ = (
        "key_path",
        "min_uid",
        "owners",
        "renew_before",
        "renew_fraction",
        "slurm_user",
        "spool_dir",
        "token_dir",
    )

    def __init__(self, doc: dict[str, Any]) -> None:
        for name, table in doc.items():
            if name in NOT_READ - set(_ARRAYS.values()) and isinstance(table, dict):
                continue
            if _ARRAYS.get(name) in NOT_READ and isinstance(table, list):
                continue  # [[service]]
            keys = READ_KEYS.get(name)
            if keys is None or not isinstance(table, dict) or not table.keys() <= keys:
                raise Unsure(f"[{name}] has keys the full path checks")
        key, token = doc.get("key", {}), doc.get("token", {})
        producer, pam = doc.get("producer", {}), doc.get("pam", {})
        store, login = doc.get("store", {}), doc.get("login", {})
        if key.get("source", "file") != "file" or key.get("algorithm", "HS256") != "HS256":
            raise Unsure("not a file HS256 key")
        self.key_path = _abspath(key.get("path", "/etc/slurm/jwt_hs256.key"))
        self.owners = _usernames(key.get("owners", ["slurm"]))
        _abspath(key.get("cache_path", "/"))
        duration(key.get("refresh", 1))

        lifetime = duration(token.get("lifetime", 2 * 86400))
        if duration(token.get("renew_until", 7 * 86400)) < lifetime:
            raise Unsure("token.renew_until shorter than the lifetime")
        self.renew_before = duration(token.get("renew_before", 3600))
        self.renew_fraction = _fraction(token.get("renew_fraction", 0.25))
        sinks = token.get("sinks", [])
        if token.get("kind", "slurm_jwt") != "slurm_jwt" or not isinstance(sinks, list):
            raise Unsure("another token kind")
        if any(sink != "login_files" for sink in sinks):
            raise Unsure("a plugin sink")

        self.slurm_user = _username(producer.get("slurm_user", "slurm"))
        _boolean(producer.get("allow_privileged_users", False))
        _usernames(producer.get("admins", []))
        _abspath(producer.get("socket", "/"))

        _boolean(pam.get("required", False))
        self.min_uid = pam.get("min_uid", 1000)
        if type(self.min_uid) is not int or not 0 <= self.min_uid <= 2**31:
            raise Unsure("pam.min_uid")

        _store_url(store.get("url", "sqlite:////var/lib/tokenlife/tokenlife.db"))
        self.spool_dir = _abspath(store.get("spool_dir", "/var/lib/tokenlife/spool"))
        duration(store.get("purge_after", 1))
        self.token_dir = _abspath(login.get("token_dir", "/run/tokenlife"))


def _text(value: object) -> str:
    if not isinstance(value, str) or not value or any(ord(c) < 32 for c in value):
        raise Unsure("not a plain string")
    return value


def _abspath(value: object) -> str:
    text = _text(value)
    if not text.startswith("/") or "/../" in f"{text}/":
        raise Unsure("not an absolute path")
    return text


def _username(value: object) -> str:
    return check_name(_text(value))


def _usernames(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise Unsure("not a list of user names")
    return tuple(_username(v) for v in value)


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise Unsure("not a boolean")
    return value


def _fraction(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise Unsure("not a fraction")
    return float(value)


def duration(value: object) -> int:
    """tokenlife.durations.parse_duration, for the values it accepts; Unsure otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise Unsure("not a duration")
    try:
        return parse_duration(value)
    except ValueError:
        raise Unsure("not a duration") from None


def _store_url(value: object) -> None:
    text = _text(value)
    if text.startswith("sqlite:///"):
        path = text[len("sqlite:///") :]
        if path == ":memory:" or path.startswith("/"):
            return
    elif text.startswith("postgresql://"):
        return
    elif text.startswith("postgresql+"):
        driver, sep, _ = text[len("postgresql+") :].partition("://")
        if sep and driver and set(driver) <= _NAME_FIRST:
            return
    raise Unsure("a store URL the full path checks")


def check_name(name: str) -> str:
    """tokenlife.users.validate_name, for the names it accepts; Unsure otherwise."""
    if not 0 < len(name) <= 32 or name[0] not in _NAME_FIRST or not set(name) <= _NAME_REST:
        raise Unsure("not a portable user name")
    return name


def load_settings(config_path: str | None) -> Settings:
    """The settings from the file tokenlife.config.load would read."""
    explicit = bool(config_path) or bool(os.environ.get(ENV_VAR))
    path = config_path or os.environ.get(ENV_VAR) or DEFAULT_CONFIG
    try:
        raw = _read(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        if explicit:
            raise Unsure("no configuration file") from None
        raw = b""  # the built-in defaults, as tokenlife.config.load
    return Settings(parse_toml(raw.decode("utf-8")))


def _read(path: str, flags: int) -> bytes:
    """A regular file of at most 1 MiB, checked on the open descriptor (never waits)."""
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_FILE:
            raise Unsure(f"{path}: not a regular file of at most 1 MiB")
        data = os.read(fd, _MAX_FILE + 1)
    finally:
        os.close(fd)
    if len(data) != st.st_size:
        raise Unsure(f"{path}: changed while read")
    return data


# -- the token --------------------------------------------------------------------------------


def _sha256() -> Any:
    # hashlib would load OpenSSL (milliseconds); the builtin module is enough.
    return __import__("_sha2" if sys.version_info >= (3, 12) else "_sha256").sha256


_SHA256 = _sha256()
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


def hmac_sha256(key: bytes, message: bytes) -> bytes:
    """RFC 2104 HMAC-SHA256, as hmac.new(key, message, hashlib.sha256).digest()."""
    if len(key) > 64:
        key = _SHA256(key).digest()
    key = key.ljust(64, b"\0")
    inner = _SHA256(key.translate(_IPAD))
    inner.update(message)
    outer = _SHA256(key.translate(_OPAD))
    outer.update(inner.digest())
    digest: bytes = outer.digest()
    return digest


_TO_URL = bytes.maketrans(b"+/", b"-_")
_FROM_URL = bytes.maketrans(b"-_", b"+/")


def b64url(data: bytes) -> str:
    """tokenlife.jwtlite.b64url."""
    return binascii.b2a_base64(data, newline=False).rstrip(b"=").translate(_TO_URL).decode()


#: the only header tokenlife's HS256 tokens carry (tokenlife.jwtlite)
_HEADER = b64url(b'{"alg":"HS256","typ":"JWT"}')


class _JsonContext:
    """What json.JSONDecoder hands the C scanner: plain JSON, plain types."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = None  # NaN, Infinity: a TypeError, so Unsure


_context: Any = _JsonContext()
_SCAN = _json.make_scanner(_context)


def json_value(text: str) -> Any:
    """json.loads(text), for the text it accepts; an exception otherwise."""
    start = len(text) - len(text.lstrip(" \t\n\r"))
    value, end = _SCAN(text, start)
    if text[end:].strip(" \t\n\r"):
        raise Unsure("not one JSON value")
    return value


def _claims(token: str, secret: bytes) -> dict[str, Any]:
    """The payload of a token tokenlife signed with ``secret`` (jwtlite.verify_hs256 and
    slurm_jwt.read_claims would accept it alike); Unsure for any other."""
    parts = token.split(".")
    if (
        len(token) > _MAX_TOKEN
        or not set(token) <= _TOKEN_CHARS
        or len(parts) != 3
        or parts[0] != _HEADER
        or not parts[1]
    ):
        raise Unsure("not a token of tokenlife's")
    signature = b64url(hmac_sha256(secret, f"{parts[0]}.{parts[1]}".encode("ascii")))
    if not _operator._compare_digest(signature, parts[2]):
        raise Unsure("not signed with this key")
    encoded = parts[1].encode("ascii").translate(_FROM_URL)
    text = binascii.a2b_base64(encoded + b"=" * (-len(encoded) % 4), strict_mode=True).decode(
        "ascii"
    )
    if text.count("[") + text.count("{") > _MAX_DEPTH:
        raise Unsure("nested too deeply")  # slurm_jwt.json_object's bound
    claims = json_value(text)
    if not isinstance(claims, dict):
        raise Unsure("not tokenlife's claims")
    return claims


# -- the login ---------------------------------------------------------------------------------

_RECORD_TEXT = ("token_id", "user", "key_id", "state", "token")
_RECORD_INT = ("uid", "gid", "first_issued", "iat", "exp", "renew_until", "lifetime")


def in_place(user: str, config_path: str | None) -> bool:
    """True if the full path would change nothing for this login: the user's
    token is good and in place, or the user is below pam.min_uid.  False
    whenever that is not certain."""
    try:
        return _in_place(user, config_path)
    except Exception:  # Unsure, and anything unforeseen: the full path decides and reports
        return False


def _in_place(user: str, config_path: str | None) -> bool:
    if os.geteuid() != 0:
        return False  # other callers mint by other rules (producer.mint.Minter.authorize)
    check_name(user)
    settings = load_settings(config_path)
    entry = pwd.getpwnam(user)  # an unknown user, or a failing database: the full path tells
    os.getgrouplist(entry.pw_name, entry.pw_gid)  # the full path's lookup() reads them too
    # The database's spelling of the name, as the full path's records and claims use it.
    name = check_name(entry.pw_name)
    if entry.pw_uid < settings.min_uid:
        return True  # no token below pam.min_uid
    if entry.pw_uid in (0, pwd.getpwnam(settings.slurm_user).pw_uid):
        return False  # a privileged token: refused, or minted with a warning
    owners = {0, os.geteuid(), *(pwd.getpwnam(name).pw_uid for name in settings.owners)}
    secret = _key(settings.key_path, owners)
    record = _record(f"{settings.spool_dir}/{name}.json")

    # producer.mint.Minter.reusable
    now = int(time.time())
    if record["state"] != "active" or record["uid"] != entry.pw_uid:
        return False
    margin = max(settings.renew_before, int(record["lifetime"] * settings.renew_fraction))
    if now >= record["exp"] - margin or now >= record["renew_until"]:
        return False
    if now - record["first_issued"] >= record["lifetime"]:
        return False  # an old chain: this login starts a new one
    if record["key_id"] != "sha256:" + _SHA256(secret).hexdigest()[:16]:
        return False
    claims = _claims(record["token"], secret)
    subject = claims.get("sun") or claims.get("username")
    if (
        type(claims.get("exp")) is not int
        or type(claims.get("iat")) not in (int, type(None))
        or subject != name
    ):
        return False
    return _login_file_in_place(settings.token_dir, record)


def _key(path: str, owners: set[int]) -> bytes:
    """tokenlife.fsutil.read_private_file's checks, then HS256Key's length check."""
    fd = os.open(path, _O_READ)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077 or st.st_uid not in owners:
            raise Unsure("the key file fails the full path's checks")
        if st.st_size > _MAX_FILE:
            raise Unsure("key file too large")
        secret = os.read(fd, _MAX_FILE + 1)
    finally:
        os.close(fd)
    if not 32 <= len(secret) <= _MAX_FILE:
        raise Unsure("not an HS256 key")
    return secret


def _record(path: str) -> dict[str, Any]:
    """The user's spool record (producer.spool), every field of the expected type."""
    record = json_value(_read(path, _O_READ).decode("ascii"))
    if not isinstance(record, dict):
        raise Unsure("not a record")
    for name in _RECORD_TEXT:
        if type(record.get(name)) is not str:
            raise Unsure(f"record without {name}")
    for name in _RECORD_INT:
        if type(record.get(name)) is not int:
            raise Unsure(f"record without {name}")
    return record


def _login_file_in_place(token_dir: str, record: dict[str, Any]) -> bool:
    """What producer.loginfile.write_login_token would leave as it is."""
    uid, gid = record["uid"], record["gid"]
    data: bytes = record["token"].encode("ascii")
    user_dir = f"{token_dir}/{uid}"
    if not os.path.isdir(token_dir):
        return False
    st = os.lstat(user_dir)
    if not stat.S_ISDIR(st.st_mode) or (st.st_uid, st.st_gid) != (uid, gid):
        return False
    if stat.S_IMODE(st.st_mode) != 0o700:
        return False
    # The user owns the directory: never follow a link, never wait on a FIFO.
    fd = os.open(f"{user_dir}/slurm_jwt", _O_READ)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) != 0o600:
            return False
        if (st.st_uid, st.st_gid) != (uid, gid) or st.st_size != len(data):
            return False
        return os.read(fd, len(data) + 1) == data
    finally:
        os.close(fd)
