"""Service accounts ([[service]]) end to end: a real ``tokenlife serve`` keeps a
short-lived token for an unprivileged user valid on real OpenSSH nodes across
several chains, with the file's owner, group and mode as configured; a node
whose directory is unsafe is refused alone; root is refused unless allowed."""

from __future__ import annotations

import grp
import json
import os
import pwd
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer.keys import HS256Key
from tests.conftest import require_root, require_tool, run_cli, tokenlife_bin
from tests.integration.conftest import write_hs_key
from tests.integration.harness.sshnodes import SshNodes
from tests.integration.harness.users import TEST_GROUP
from tests.unit.test_metrics import free_port, parse, scrape
from tokenlife.slurm_jwt import SlurmJwt

SERVICE_DIR = "/run/tokenlife/svc"  # on the nodes' private tmpfs
SERVICE_PATH = f"{SERVICE_DIR}/jwt"
#: 8 s tokens in 16 s chains, renewed or replaced 4 s ahead, a tick every second
LIFETIME, RENEW_UNTIL, MARGIN = 8, 16, 4


@pytest.fixture(scope="module")
def ssh_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshNodes]:
    require_root()
    require_tool("sshd", "unshare", "nsenter", "ssh-keygen")
    with SshNodes(tmp_path_factory.mktemp("ssh"), 2) as nodes:
        yield nodes


def write_config(tmp_path: Path, nodes: SshNodes, service: str, metrics: str = "") -> Path:
    key = tmp_path / "jwt_hs256.key"
    if not key.exists():
        write_hs_key(key)
    cfg = tmp_path / "tokenlife.toml"
    cfg.write_text(
        f'[key]\npath = "{key}"\n'
        f'[store]\nurl = "sqlite:///{tmp_path}/db.sqlite"\nspool_dir = "{tmp_path}/spool"\n'
        f'[login]\ntoken_dir = "{tmp_path}/run"\n'
        f'[producer]\nsocket = "{tmp_path}/mint.sock"\n'
        f'[token]\nlifetime = "1h"\nrenew_until = "1d"\nrenew_before = "{MARGIN}"\n'
        '[delivery]\ntransport = "ssh"\njobs = "static"\n'
        f'[delivery.ssh]\nidentity_file = "{nodes.client_key}"\n'
        f'known_hosts = "{nodes.known_hosts}"\nssh_config = "{nodes.ssh_config}"\n'
        'connect_timeout = "5"\n'
        f'[serve]\ninterval = "1"\nmetrics = "{metrics}"\n' + service
    )
    return cfg


def service_entry(user: str, *extra: str) -> str:
    lines = [
        "[[service]]",
        f'user = "{user}"',
        'hosts = ["node01", "node02"]',
        f'path = "{SERVICE_PATH}"',
        f'lifetime = "{LIFETIME}"',
        f'renew_until = "{RENEW_UNTIL}"',
        *extra,
    ]
    return "\n".join(lines) + "\n"


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_serve_keeps_a_valid_token_on_the_nodes_across_chains(
    ssh_nodes: SshNodes, tmp_path: Path, test_users: tuple[str, str]
) -> None:
    alice = test_users[0]
    for node in ssh_nodes:
        ssh_nodes.reboot_node(node.name)  # an empty /run/tokenlife
    ssh_nodes.write_known_hosts()
    node01, node02 = ssh_nodes["node01"], ssh_nodes["node02"]
    node01.run(["install", "-d", "-m", "0755", SERVICE_DIR])
    node02.run(["install", "-d", "-m", "0777", SERVICE_DIR])  # others could swap the file
    port = free_port()
    cfg = write_config(
        tmp_path,
        ssh_nodes,
        service_entry(alice, f'group = "{TEST_GROUP}"', 'mode = "0640"'),
        metrics=f"127.0.0.1:{port}",
    )
    uid, gid = pwd.getpwnam(alice).pw_uid, grp.getgrnam(TEST_GROUP).gr_gid
    key = HS256Key((tmp_path / "jwt_hs256.key").read_bytes())
    log = tmp_path / "serve.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [tokenlife_bin(), "-c", str(cfg), "-v", "serve"], stdout=err, stderr=err
        )
    try:
        deadline = time.monotonic() + 15
        while not node01.exists(SERVICE_PATH):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"no token file on node01\n{log.read_text()}"
            time.sleep(0.05)
        st = node01.stat(SERVICE_PATH)
        assert (st.kind, st.mode, st.uid, st.gid) == ("file", 0o640, uid, gid)

        chains: dict[int, set[int]] = {}  # renew-until (one per chain) -> versions seen
        seen: set[str] = set()
        # node02 is refused, alone, until its directory is made safe; then it catches up.
        refused = (
            f"WARNING transfer.service_delivery: service {alice}: delivery failed: node02: "
            f"{SERVICE_DIR} must be owned by root and not group/world-writable"
        )
        started, fixed = time.monotonic(), False
        while len(chains) < 3 or not node02.exists(SERVICE_PATH):
            assert time.monotonic() - started < 75, f"chains {chains}\n{log.read_text()}"
            assert proc.poll() is None, log.read_text()
            text = node01.read_text(SERVICE_PATH)
            now = time.time()
            seen.add(text)
            claims = key.verify(text)  # ours, signed by the key
            view = SlurmJwt().read(text)
            assert view.subject == alice and claims["sun"] == alice
            assert view.iat <= now + 1 and now < view.exp, (view, now, chains)
            assert view.renew_until is not None and view.version is not None
            chains.setdefault(view.renew_until, set()).add(view.version)
            if not fixed and refused in log.read_text():
                assert not node02.exists(SERVICE_PATH)
                node02.run(["chmod", "0755", SERVICE_DIR])
                fixed = True
            time.sleep(0.2)
        st = node01.stat(SERVICE_PATH)
        assert (st.kind, st.mode, st.uid, st.gid) == ("file", 0o640, uid, gid)
        assert max(len(v) for v in chains.values()) >= 2, chains  # renewed within a chain
        st = node02.stat(SERVICE_PATH)
        assert (st.kind, st.mode, st.uid, st.gid) == ("file", 0o640, uid, gid)
        assert SlurmJwt().read(node02.read_text(SERVICE_PATH)).exp > time.time()
        # The metrics tell it too: node02's refusals, the files delivered, the
        # tokens minted and kept (an alert reads the failures).
        figures = parse(scrape(port))
        results = {
            (name, labels[0][1]): value
            for (name, labels), value in figures.items()
            if name in ("tokenlife_service_tokens_total", "tokenlife_service_file_results_total")
        }
        assert results[("tokenlife_service_file_results_total", "failed")] >= 1, results
        assert results[("tokenlife_service_file_results_total", "delivered")] >= 4, results
        assert results[("tokenlife_service_tokens_total", "minted")] >= 3, results
        assert results[("tokenlife_service_tokens_total", "kept")] >= 1, results
        assert results[("tokenlife_service_tokens_total", "failed")] == 0, results
    finally:
        stop(proc)
    assert proc.returncode == 0
    for node in (node01, node02):  # the last tick finished: no temporary file, no lock left
        assert node.listdir(SERVICE_DIR) == ["jwt"]
    output = log.read_text()
    assert "Traceback" not in output
    assert "minted token" in output and "renewed token" in output
    assert not any(token in output for token in seen)  # never a token in the log

    # The one-shot commands: renew (a new chain if the old one ended), push, status.
    renew = run_cli("-c", str(cfg), "renew")
    assert renew.returncode == 0, renew.stderr
    assert renew.stdout.splitlines()[1].startswith("services: ")
    push = run_cli("-c", str(cfg), "push", "--node", "node01")
    assert push.returncode == 0, push.stderr
    assert push.stdout.splitlines()[1] in (
        "service files: delivered 1, unchanged 0, failed 0",
        "service files: delivered 0, unchanged 1, failed 0",
    )
    assert SlurmJwt().read(node01.read_text(SERVICE_PATH)).exp > time.time()
    status = run_cli("-c", str(cfg), "status", "--json")
    assert status.returncode == 0, status.stderr
    (service,) = json.loads(status.stdout)["services"]
    assert service["user"] == alice and service["hosts"]["node01"]["current"] is True
    text = run_cli("-c", str(cfg), "status").stdout
    assert f"service     {alice}: v" in text and "node01 current" in text


def test_root_is_refused_unless_allowed(
    ssh_nodes: SshNodes, tmp_path: Path, test_users: tuple[str, str]
) -> None:
    cfg = write_config(tmp_path, ssh_nodes, service_entry("root"))
    started = time.monotonic()
    serve = subprocess.run(
        [tokenlife_bin(), "-c", str(cfg), "serve"], capture_output=True, text=True, timeout=60
    )
    assert serve.returncode == 2 and time.monotonic() - started < 30
    assert serve.stderr.strip() == (
        f"tokenlife-serve: {cfg}: service[1].user: 'root' is privileged (its token can act as "
        "any user over slurmrestd); set allow_privileged = true to allow it"
    )
    assert not (tmp_path / "db.sqlite").exists()  # nothing was minted

    cfg = write_config(tmp_path, ssh_nodes, service_entry("root", "allow_privileged = true"))
    check = run_cli("-c", str(cfg), "config", "check")
    assert check.returncode == 0, check.stderr
    assert (
        "warning: service root: allow_privileged = true: uid 0 gets a token that can act as "
        "any user over slurmrestd"
    ) in check.stdout.splitlines()
    renew = run_cli("-c", str(cfg), "renew")
    assert renew.returncode == 0, renew.stderr
    assert "services: minted 1, kept 0, failed 0" in renew.stdout
    assert "minted a PRIVILEGED token (uid 0" in renew.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "db.sqlite").st_mode) & 0o077 == 0


HOOK = """#!/bin/sh
echo "$TOKENLIFE_USER $TOKENLIFE_FILE $TOKENLIFE_RENEW_UNTIL $TOKENLIFE_VERSION $TOKENLIFE_EXP" \\
    >> {record}
"""


def test_a_watcher_on_the_node_runs_its_hook_once_per_change_across_chains(
    ssh_nodes: SshNodes, tmp_path: Path, test_users: tuple[str, str]
) -> None:
    """Both halves of a service on its host: the token host keeps the service's
    file there across chains, and ``tokenlife-engine watch``, running on the
    node as the service account, runs its hook once per new token."""
    alice = test_users[0]
    for node in ssh_nodes:
        ssh_nodes.reboot_node(node.name)
    ssh_nodes.write_known_hosts()
    node01 = ssh_nodes["node01"]
    for node in ssh_nodes:
        node.run(["install", "-d", "-m", "0755", SERVICE_DIR])
    cfg = write_config(tmp_path, ssh_nodes, service_entry(alice))  # owner alice, 0600
    shared = Path(tempfile.mkdtemp(prefix="tl-svc-hook-"))
    shared.chmod(0o1777)
    record = shared / "runs"
    hook = shared / "hook.sh"
    hook.write_text(HOOK.format(record=record))
    hook.chmod(0o755)
    engine = Path(tokenlife_bin()).with_name("tokenlife-engine")
    pw = pwd.getpwnam(alice)
    as_alice = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups"]
    enter = ["nsenter", f"--target={node01.pid}", "--mount", "--"]
    log = tmp_path / "serve.log"
    watch_log = tmp_path / "watch.log"
    with open(log, "wb") as err:
        serve = subprocess.Popen(
            [tokenlife_bin(), "-c", str(cfg), "-v", "serve"], stdout=err, stderr=err
        )
    watcher: subprocess.Popen[bytes] | None = None
    seen: set[tuple[int, int, int]] = set()  # (renew_until, version, exp) the file held
    try:
        deadline = time.monotonic() + 15
        while not node01.exists(SERVICE_PATH):
            assert serve.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"no token file on node01\n{log.read_text()}"
            time.sleep(0.05)
        with open(watch_log, "wb") as err:
            watcher = subprocess.Popen(
                [
                    *enter,
                    *as_alice,
                    str(engine),
                    "watch",
                    "--file",
                    SERVICE_PATH,
                    "--timeout",
                    "10",
                    "--",
                    str(hook),
                ],
                stdout=err,
                stderr=err,
                env={"PATH": "/usr/bin:/bin"},
            )
        first_run: float | None = None
        started = time.monotonic()
        while len({r for r, _, _ in seen}) < 4:  # the chain at start and 3 more
            assert time.monotonic() - started < 90, f"{seen}\n{log.read_text()}"
            assert serve.poll() is None and watcher.poll() is None, watch_log.read_text()
            if first_run is None and record.exists():
                first_run = time.monotonic()
            if first_run is not None:
                view = SlurmJwt().read(node01.read_text(SERVICE_PATH))
                assert view.renew_until is not None and view.version is not None
                seen.add((view.renew_until, view.version, view.exp))
            time.sleep(0.2)
        time.sleep(2)  # the hook for the last token sampled has run
    finally:
        if watcher is not None:
            watcher.send_signal(signal.SIGTERM)
            try:
                watcher.wait(20)
            except subprocess.TimeoutExpired:
                watcher.kill()
                watcher.wait()
        stop(serve)
    assert watcher is not None and watcher.returncode == 0, watch_log.read_text()
    runs = [line.split() for line in record.read_text().splitlines()]
    identities = [(int(r), int(v), int(e)) for _, _, r, v, e in runs]
    # Exactly once: no token hooked twice; and every token the file held while
    # watched (sampled five times a second) was hooked.
    assert len(identities) == len(set(identities)), runs
    assert seen <= set(identities), (seen, runs)
    assert len({r for r, _, _ in identities}) >= 3, runs  # across chains
    assert {(u, f) for u, f, *_ in runs} == {(alice, SERVICE_PATH)}
    assert "Traceback" not in watch_log.read_text()
