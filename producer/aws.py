"""AWS Secrets Manager key source, with a local cache so logins never wait on AWS.

The secret holds Slurm's HS256 key base64-encoded in SecretString (as the AWS
PCS guide stores it) or raw in SecretBinary.  A fetched key is cached in a
0600 file; within ``refresh`` the cache is used as is.  When AWS cannot be
reached the stale cache keeps minting working, with a warning in the log.

The cache belongs to the owner of its directory (the service account's
0700 state directory): the daemon writes it as that account, the PAM
fallback reads it as root, and a cache that root writes is handed to that
account.  A key change is logged once per process, by key id.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

from producer.keys import HS256Key, allowed_owners
from tokenlife.config import KeyConfig
from tokenlife.errors import KeySourceError
from tokenlife.fsutil import read_private_file, write_secret

log = logging.getLogger(__name__)


class AwsKeySource:
    def __init__(
        self,
        config: KeyConfig,
        prefer_cache: bool = False,
        now: Any = time.time,
        ask_aws: bool = False,
    ) -> None:
        self.config = config
        self.prefer_cache = prefer_cache
        self._now = now
        #: the next load asks AWS whatever the cache holds, and fails if AWS does
        self._ask_aws = ask_aws
        #: the id of the key this source gave out last (never the key)
        self._key_id: str | None = None

    def fresh(self) -> AwsKeySource:
        """A source whose first load asks Secrets Manager, never the cache, and
        then caches what it got: how ``rotate-key`` picks up a new version at once."""
        return AwsKeySource(self.config, now=self._now, ask_aws=True)

    def describe(self) -> str:
        which = self.config.version_id or self.config.version_stage or "AWSCURRENT"
        where = self.config.endpoint_url or f"region {self.config.region or '(default)'}"
        cache = self.config.cache_path
        return f"aws secret {self.config.secret_id} ({which}) via {where}, cache {cache}"

    def load(self) -> HS256Key:
        cached = self._read_cache()
        if cached is not None:
            fetched_at, key = cached
            age = self._now() - fetched_at
            if not self._ask_aws and (age < self.config.refresh or self.prefer_cache):
                return self._given(HS256Key(key))
        try:
            fresh = HS256Key(self.fetch())  # validated before it may be cached
        except KeySourceError as exc:
            if cached is None or self._ask_aws:
                raise
            log.warning("%s; using the cached key fetched %ds ago", exc, int(age))
            return self._given(HS256Key(cached[1]))
        self._write_cache(fresh.secret_bytes())
        self._ask_aws = False  # asked once: later loads read the cache just written
        if self._key_id is None and cached is not None:
            self._key_id = _key_id(cached[1])  # what this process would have used
        return self._given(fresh)

    def _given(self, key: HS256Key) -> HS256Key:
        """Hand out ``key``, saying so once when it differs from the last one."""
        if self._key_id is not None and self._key_id != key.key_id:
            log.warning(
                "AWS key of secret %s changed: %s -> %s",
                self.config.secret_id,
                self._key_id,
                key.key_id,
            )
        self._key_id = key.key_id
        return key

    def fetch(self) -> bytes:
        """Ask Secrets Manager for the key; every failure is a KeySourceError."""
        import boto3
        import botocore.exceptions

        c = self.config
        kwargs: dict[str, str] = {"SecretId": c.secret_id or ""}
        if c.version_id:
            kwargs["VersionId"] = c.version_id
        elif c.version_stage:
            kwargs["VersionStage"] = c.version_stage
        try:
            client = boto3.client(
                "secretsmanager", region_name=c.region, endpoint_url=c.endpoint_url
            )
            answer = client.get_secret_value(**kwargs)
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "error")
            raise KeySourceError(f"AWS Secrets Manager refused {c.secret_id}: {code}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise KeySourceError(f"AWS Secrets Manager unreachable: {type(exc).__name__}") from exc
        if answer.get("SecretBinary") is not None:
            return bytes(answer["SecretBinary"])
        try:
            return base64.b64decode("".join(answer["SecretString"].split()), validate=True)
        except (binascii.Error, ValueError, KeyError) as exc:
            raise KeySourceError(f"secret {c.secret_id} is not base64 of the key") from exc

    def _read_cache(self) -> tuple[float, bytes] | None:
        path = self.config.cache_path
        try:
            path.lstat()
        except FileNotFoundError:
            return None
        except OSError as exc:  # e.g. the service's 0700 state directory
            raise KeySourceError(
                f"AWS key cache {path} is not readable by uid {os.geteuid()} ({exc.strerror})"
            ) from exc
        owners = allowed_owners(self.config) | _sole_writer(path.parent)
        raw = read_private_file(path, owners, what="AWS key cache")
        try:
            data = json.loads(raw)
            if data.get("selection") != self._selection():
                return None  # cached for another secret or version: do not use it
            return float(data["fetched_at"]), base64.b64decode(data["key"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            log.warning("AWS key cache %s is corrupt; ignoring it", path)
            return None

    def _selection(self) -> list[str | None]:
        """What the cache was fetched for: the secret and the version asked for."""
        c = self.config
        return [c.secret_id, c.version_id, c.version_stage, c.endpoint_url, c.region]

    def _write_cache(self, key: bytes) -> None:
        """Cache the key; a cache that cannot be written costs a warning, not the key."""
        path = self.config.cache_path
        data = {
            "selection": self._selection(),
            "fetched_at": self._now(),
            "key": base64.b64encode(key).decode(),
        }
        try:
            os.makedirs(path.parent, mode=0o700, exist_ok=True)
            # Root (a login, rotate-key) hands the cache to the directory's owner,
            # the service account, which then reads it without any capability.
            owner = _sole_writer(path.parent) if os.geteuid() == 0 else set()
            uid = next(iter(owner), None)
            gid = path.parent.stat().st_gid if uid is not None else None
            write_secret(path, json.dumps(data).encode(), uid, gid, mode=0o600)
        except OSError as exc:
            log.warning("cannot write the AWS key cache %s: %s", path, exc.strerror or exc)


def _sole_writer(directory: Path) -> set[int]:
    """The owner of ``directory`` if nobody else may write in it, else nobody.

    That owner can replace any file there at will, so a cache it owns is no
    weaker than one root owns; in a directory others may write, nobody's
    ownership vouches for anything.
    """
    try:
        st = os.stat(directory)
    except OSError:
        return set()
    if not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o022:
        return set()
    return {st.st_uid}


def _key_id(secret: bytes) -> str | None:
    try:
        return HS256Key(secret).key_id
    except KeySourceError:
        return None
