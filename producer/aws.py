"""AWS Secrets Manager key source, with a local cache so logins never wait on AWS.

The secret holds Slurm's HS256 key base64-encoded in SecretString (as the AWS
PCS guide stores it) or raw in SecretBinary.  A fetched key is cached in a
0600 file; within ``refresh`` the cache is used as is.  When AWS cannot be
reached the stale cache keeps minting working, with a warning in the log.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import time
from typing import Any

from producer.keys import HS256Key, allowed_owners
from tokenlife.config import KeyConfig
from tokenlife.errors import KeySourceError
from tokenlife.fsutil import read_private_file, write_secret

log = logging.getLogger(__name__)


class AwsKeySource:
    def __init__(self, config: KeyConfig, prefer_cache: bool = False, now: Any = time.time) -> None:
        self.config = config
        self.prefer_cache = prefer_cache
        self._now = now

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
            if age < self.config.refresh or self.prefer_cache:
                return HS256Key(key)
        try:
            fresh = HS256Key(self.fetch())  # validated before it may be cached
        except KeySourceError as exc:
            if cached is None:
                raise
            log.warning("%s; using the cached key fetched %ds ago", exc, int(age))
            return HS256Key(cached[1])
        self._write_cache(fresh.secret_bytes())
        return fresh

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
        if not path.exists():
            return None
        raw = read_private_file(path, allowed_owners(self.config), what="AWS key cache")
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
        path = self.config.cache_path
        os.makedirs(path.parent, mode=0o700, exist_ok=True)
        data = {
            "selection": self._selection(),
            "fetched_at": self._now(),
            "key": base64.b64encode(key).decode(),
        }
        write_secret(path, json.dumps(data).encode(), mode=0o600)
