"""R6: every parser meets arbitrary input with its documented error and nothing else.

Hypothesis generates the inputs (a fixed number of examples per property, no
deadline: CI machines are slow and noisy).  What may come out of each parser:

| parser | documented errors |
| --- | --- |
| config (tokenlife.config.parse) | ConfigError |
| durations (parse_duration) | ValueError |
| hostlists (transfer.hostlist.expand) | ValueError |
| squeue --json (transfer.jobs.parse_squeue) | ValueError, TypeError, KeyError (one line) |
| token payloads (SlurmJwt.read, the engine's parse) | ValueError / Refused |
| engine settings ([engine] table) | ValueError |
"""

from __future__ import annotations

import base64
import json
import string
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client_engine.tokens import Refused
from client_engine.tokens import parse as engine_parse
from tokenlife import config as configmod
from tokenlife import engine_settings
from tokenlife.durations import parse_duration
from tokenlife.errors import ConfigError
from tokenlife.slurm_jwt import SlurmJwt
from transfer.hostlist import expand
from transfer.jobs import parse_squeue

FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=30,
)
SECTIONS = ["key", "token", "producer", "pam", "store", "login", "delivery", "engine", "serve"]
KEYS = [
    "source", "path", "algorithm", "kid", "owners", "lifetime", "renew_until", "renew_before",
    "renew_fraction", "kind", "sinks", "slurm_user", "admins", "socket", "required", "min_uid",
    "url", "spool_dir", "purge_after", "token_dir", "transport", "remote_dir", "jobs", "root",
    "ssh", "static", "interval", "metrics", "deliver", "export_jwt", "refresh", "secret_id",
]  # fmt: skip
config_tables = st.dictionaries(
    st.sampled_from(SECTIONS) | st.text(max_size=8),
    st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), json_values, max_size=6)
    | json_values,
    max_size=5,
)


@FUZZ
@given(config_tables)
def test_config_parse(data: dict[str, Any]) -> None:
    try:
        configmod.parse(data, "fuzz.toml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.toml") and "\n" not in str(exc)


@FUZZ
@given(st.text(max_size=20) | st.integers() | st.sampled_from(["1h", "2d", "١٢h", "1e9", " 5m"]))
def test_durations(text: Any) -> None:
    try:
        value = parse_duration(text)
    except ValueError as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(value, int) and value > 0


hostlists = st.text(alphabet="n0123456789[]-,.x", max_size=30) | st.text(max_size=30)


@FUZZ
@given(hostlists)
def test_hostlists(expression: str) -> None:
    try:
        nodes = expand(expression)
    except ValueError as exc:
        assert "\n" not in str(exc)
    else:
        assert all(isinstance(node, str) and node for node in nodes)


jobs = st.fixed_dictionaries(
    {},
    optional={
        "job_state": json_values | st.sampled_from(["RUNNING", ["RUNNING"], "PENDING"]),
        "nodes": json_values | st.sampled_from(["n[1-3]", "n01,n02", ""]),
        "user_name": json_values | st.sampled_from(["alice", "../etc", "-rf"]),
    },
)


@FUZZ
@given(st.fixed_dictionaries({"jobs": st.lists(jobs, max_size=4)}) | json_values)
def test_squeue_json(data: Any) -> None:
    try:
        needs = parse_squeue(data)
    except (ValueError, TypeError, KeyError):
        return
    for user, nodes in needs.items():
        assert user and not user.startswith("-") and "/" not in user
        assert all("/" not in node for node in nodes)


def jwt_like(payload: bytes) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return f"{b64(b'{}')}.{b64(payload)}.{b64(b'sig')}"


payloads = (
    json_values.map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=60)
    | st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n)
    | st.integers(1, 5000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n)
)


@FUZZ
@given(payloads | st.text(alphabet=string.printable, max_size=80).map(str.encode))
def test_token_payloads(payload: bytes) -> None:
    for text in (jwt_like(payload), payload.decode("latin-1")):
        try:
            view = SlurmJwt().read(text)
        except ValueError as exc:
            assert "\n" not in str(exc)
        else:
            assert isinstance(view.subject, str) and isinstance(view.exp, int)
        try:
            engine_parse(text, "SLURM_JWT")
        except Refused as exc:
            assert str(exc).startswith("SLURM_JWT: ")


@FUZZ
@given(st.dictionaries(st.text(max_size=15), json_values, max_size=5) | json_values)
def test_engine_settings(table: Any) -> None:
    try:
        engine_settings.parse(table)
    except ValueError as exc:
        assert "\n" not in str(exc)
