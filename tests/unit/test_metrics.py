"""The metrics of `tokenlife serve`, scraped from a running process, and
`tokenlife status` against the same daemon; the collector on its own."""

from __future__ import annotations

import json
import logging
import secrets
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from repository.renewer import Summary
from repository.store import SqlTokenStore
from tests.conftest import run_cli, tokenlife_bin
from tests.unit.test_serve import USER, current_token, mint_in_the_past, version, wait_for
from tokenlife.app.metrics import Collector, TickStats, build_labels, metrics_url, split_address
from transfer.cycle import DeliverySummary

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse(text: str) -> Samples:
    """{(sample name, sorted labels): value} of a scrape."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(port: int) -> str:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=2) as response:
        return str(response.read().decode())


def site(tmp_path: Path, port: int) -> Path:
    key = tmp_path / "k"
    key.write_bytes(secrets.token_bytes(32))
    key.chmod(0o600)
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[key]\npath = "{key}"\n[store]\nurl = "sqlite:///{tmp_path}/db"\n'
        f'spool_dir = "{tmp_path}/spool"\n'
        f'[login]\ntoken_dir = "{tmp_path}/run"\n[producer]\nsocket = "{tmp_path}/m.sock"\n'
        '[token]\nlifetime = "1h"\nrenew_until = "1d"\n'
        f'[serve]\ninterval = "1h"\nmetrics = "127.0.0.1:{port}"\n'
        f'[delivery]\ntransport = "local"\nroot = "{tmp_path}/nodes"\njobs = "static"\n'
        f'[delivery.static]\n{USER} = ["node01", "node02", "node03"]\n'
    )
    # node03 cannot take files: its "root" is a regular file.
    (tmp_path / "nodes").mkdir()
    (tmp_path / "nodes/node03").write_text("")
    return cfg


def test_scrape_a_running_serve_and_status(tmp_path: Path) -> None:
    port = free_port()
    cfg = site(tmp_path, port)
    store = SqlTokenStore(f"sqlite:///{tmp_path}/db")
    log = (tmp_path / "serve.log").open("w+")
    try:
        old = mint_in_the_past(cfg, store, 3500)
        due = mint_in_the_past(cfg, store, 3500)  # expires the first: 1 active, 1 expired
        started = time.time()
        proc = subprocess.Popen(
            [tokenlife_bin(), "-c", str(cfg), "-vv", "serve"], stderr=log, text=True
        )
        try:
            text = ""

            def ticked() -> bool:
                nonlocal text
                try:
                    text = scrape(port)
                except OSError:
                    return False  # not listening yet
                return parse(text)[("tokenlife_last_tick_success_timestamp_seconds", ())] > 0

            wait_for(ticked, 10)
            assert version(store, due) == 2 and version(store, old) == 1
            samples = parse(text)
            token = current_token(store)

            def value(name: str, **labels: str) -> float:
                return samples[(name, tuple(sorted(labels.items())))]

            assert value("tokenlife_store_up") == 1
            assert value("tokenlife_tokens", state="active") == 1
            assert value("tokenlife_tokens", state="expired") == 1
            assert value("tokenlife_tokens", state="revoked") == 0
            assert value("tokenlife_renewals_total") == 1
            assert value("tokenlife_renewal_failures_total") == 0
            assert value("tokenlife_tick_failures_total") == 0
            assert 3500 < value("tokenlife_token_soonest_expiry_seconds") <= 3600
            # Renewable (below its renew-until), due 30 min before exp (1 h tokens).
            assert 3500 < value("tokenlife_token_soonest_renewable_expiry_seconds") <= 3600
            assert value("tokenlife_token_soonest_renewable_margin_seconds") == 1800
            # Counted from the daemon's start: the mints before it are not.
            assert value("tokenlife_events_total", event="renewed") == 1
            assert value("tokenlife_events_total", event="delivered") == 2
            assert value("tokenlife_events_total", event="minted") == 0  # at 0 from the start
            assert value("tokenlife_build_info", **build_labels()) == 1
            assert value("process_start_time_seconds") >= started - 1
            assert started - 1 <= value("tokenlife_last_renewal_timestamp_seconds")
            assert value("tokenlife_deliveries", status="delivered") == 2
            assert value("tokenlife_deliveries", status="failed") == 1
            assert value("tokenlife_delivery_results_total", result="delivered") == 2
            assert value("tokenlife_delivery_results_total", result="failed") == 1
            assert value("tokenlife_node_deliveries", node="node03", status="failed") == 1
            assert value("tokenlife_node_deliveries", node="node03", status="pending") == 0
            assert not any(labels and labels[0][1] == "node01" for _, labels in samples)
            last_tick = value("tokenlife_last_tick_success_timestamp_seconds")
            assert started <= last_tick <= time.time() and time.time() - last_tick < 60
            assert 0 < value("tokenlife_tick_duration_seconds") < 10
            assert value("tokenlife_tick_interval_seconds") == 3600
            assert token and token not in text

            # `tokenlife status` reads the same store and asks the same daemon.
            result = run_cli("-c", str(cfg), "status", "--json")
            assert result.returncode == 0, result.stderr
            data = json.loads(result.stdout)
            assert data["tokens"] == {"active": 1, "expired": 1, "revoked": 0}
            assert data["events_24h"]["renewed"] == 1
            assert data["deliveries"]["delivered"] == 2
            assert data["nodes"] == {
                "node03": {"pending": 0, "failed": 1, "error": data["nodes"]["node03"]["error"]}
            }
            assert data["nodes"]["node03"]["error"].startswith("node03: ")
            assert data["daemon"] == {
                "url": f"http://127.0.0.1:{port}/metrics",
                "reachable": True,
                "last_tick_success": int(last_tick),
                "error": "",
            }
            human = run_cli("-c", str(cfg), "status")
            assert human.returncode == 0, human.stderr
            assert f"(http://127.0.0.1:{port}/metrics)" in human.stdout
            assert "daemon      last successful tick " in human.stdout
            assert "1 failed (node03: Not a directory (" in human.stdout
            assert token not in result.stdout + human.stdout + human.stderr

            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
            with pytest.raises(OSError):  # the endpoint closed with the daemon
                scrape(port)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        log.seek(0)
        output = log.read()
        assert f"serving on http://127.0.0.1:{port}/metrics" in output
        assert token not in output
    finally:
        log.close()
        if store._sessions is not None:
            store.engine.dispose()


def test_a_taken_port_is_one_error_line_and_serve_goes_on(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        cfg = site(tmp_path, port)
        log_path = tmp_path / "serve.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen([tokenlife_bin(), "-c", str(cfg), "serve"], stderr=log)
        try:
            wait_for(lambda: "serving: socket" in log_path.read_text(), 10)
            assert proc.poll() is None
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    errors = [line for line in log_path.read_text().splitlines() if "metrics" in line]
    assert len(errors) == 2, errors
    assert errors[0].endswith(
        f"ERROR tokenlife.metrics: metrics: cannot listen on 127.0.0.1:{port}: "
        "Address already in use; serving without metrics"
    )
    assert errors[1].endswith("metrics off")


class Counting:
    """A store getter that counts the snapshots taken and can break the store."""

    def __init__(self, tmp_path: Path) -> None:
        self.good = SqlTokenStore(f"sqlite:///{tmp_path}/db")
        (tmp_path / "file").write_text("")
        self.bad = SqlTokenStore(f"sqlite:///{tmp_path}/file/db")  # cannot be created
        self.broken = False
        self.calls = 0

    def __call__(self) -> SqlTokenStore:
        self.calls += 1
        return self.bad if self.broken else self.good

    def close(self) -> None:
        self.good.engine.dispose()


def test_collector_caches_and_survives_a_broken_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stores = Counting(tmp_path)
    try:
        stats = TickStats(interval=300)
        collector = Collector(stores, stats, ttl=60)
        registry = CollectorRegistry()
        registry.register(collector)
        assert stores.calls == 0  # registering reads nothing
        first = parse(generate_latest(registry).decode())
        assert first[("tokenlife_store_up", ())] == 1
        assert first[("tokenlife_tokens", (("state", "active"),))] == 0
        assert ("tokenlife_token_soonest_expiry_seconds", ()) not in first  # no token
        assert first[("tokenlife_last_tick_success_timestamp_seconds", ())] == 0
        for _ in range(5):
            generate_latest(registry)
        assert stores.calls == 1  # a burst of scrapes costs one snapshot

        stats.renewal(Summary(renewed=3, failed=1, expired=2))
        stats.delivery(DeliverySummary(delivered=4, unchanged=1, removed=2, failed=1))
        stats.tick_done(True, 0.5, now=1234.0)
        generate_latest(registry)
        assert stores.calls == 2  # a tick ended: the store changed, the snapshot is stale

        stores.broken = True
        with caplog.at_level(logging.WARNING, "tokenlife.metrics"):
            for _ in range(2):
                stats.tick_done(False, 0.25)  # a failed tick leaves the last success alone
                broken = parse(generate_latest(registry).decode())
        assert stores.calls == 4
        assert broken[("tokenlife_store_up", ())] == 0
        assert not any(name == "tokenlife_tokens" for name, _ in broken)
        assert broken[("tokenlife_renewals_total", ())] == 3
        assert broken[("tokenlife_renewal_failures_total", ())] == 1
        assert broken[("tokenlife_tokens_expired_total", ())] == 2
        assert broken[("tokenlife_delivery_results_total", (("result", "delivered"),))] == 4
        assert broken[("tokenlife_delivery_results_total", (("result", "removed"),))] == 2
        assert broken[("tokenlife_tick_failures_total", ())] == 2
        assert broken[("tokenlife_last_tick_success_timestamp_seconds", ())] == 1234.0
        assert broken[("tokenlife_tick_duration_seconds", ())] == 0.25
        assert broken[("tokenlife_tick_interval_seconds", ())] == 300
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == 1  # logged when it broke, not at every scrape
        assert messages[0].startswith("metrics: cannot read the token store: cannot open")

        stores.broken = False
        stats.tick_done(True, 0.1, now=2000.0)
        healed = parse(generate_latest(registry).decode())
        assert healed[("tokenlife_store_up", ())] == 1
        assert healed[("tokenlife_last_tick_success_timestamp_seconds", ())] == 2000.0
    finally:
        stores.close()


def test_a_scrape_never_pairs_a_finished_tick_with_a_snapshot_from_before_it(
    tmp_path: Path,
) -> None:
    """A tick that ends while a scrape runs (after its store snapshot was taken
    from the cache) must not show up as done beside that older snapshot: a
    monitor that waits for the tick would read the store as it was mid-tick."""
    stores = Counting(tmp_path)
    try:
        stats = TickStats(interval=300)
        collector = Collector(stores, stats, ttl=60)
        registry = CollectorRegistry()
        registry.register(collector)
        generate_latest(registry)
        assert stores.calls == 1  # cached, while the first tick still runs
        take = collector.snapshot

        def tick_ends_meanwhile() -> object:
            snap = take()
            stats.tick_done(True, 0.1, now=1234.0)
            return snap

        collector.snapshot = tick_ends_meanwhile  # type: ignore[method-assign,assignment]
        during = parse(generate_latest(registry).decode())
        collector.snapshot = take  # type: ignore[method-assign]
        assert stores.calls == 1  # the cached snapshot, taken before the tick ended ...
        # ... so the tick is not shown done in this scrape,
        assert during[("tokenlife_last_tick_success_timestamp_seconds", ())] == 0
        after = parse(generate_latest(registry).decode())
        assert stores.calls == 2  # and the next one takes a new snapshot with it.
        assert after[("tokenlife_last_tick_success_timestamp_seconds", ())] == 1234.0
    finally:
        stores.close()


def test_addresses() -> None:
    assert split_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert split_address("[::1]:9464") == ("::1", 9464)
    assert metrics_url("127.0.0.1:9464") == "http://127.0.0.1:9464/metrics"
    assert metrics_url("0.0.0.0:9464") == "http://127.0.0.1:9464/metrics"
    assert metrics_url("[::]:80") == "http://[::1]:80/metrics"
