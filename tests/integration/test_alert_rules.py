"""The shipped Prometheus alert rules, checked and unit-tested by the real
``promtool`` (Debian's ``prometheus``), and a real daemon's exposition checked
by ``promtool check metrics`` against the metrics the rules use."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from repository.store import SqlTokenStore
from tests.conftest import require_tool, tokenlife_bin
from tests.unit.test_metrics import free_port, parse, scrape, site
from tests.unit.test_serve import mint_in_the_past, wait_for

RULES_DIR = Path(__file__).resolve().parents[2] / "systemd" / "prometheus"
RULES = RULES_DIR / "tokenlife-alerts.yml"
RULE_TESTS = RULES_DIR / "tokenlife-alerts.test.yml"
#: what promtool's rule tests must cover: every alert, firing and silent
ALERTS = {
    "TokenlifeMetricsAbsent",
    "TokenlifeDown",
    "TokenlifeTickStale",
    "TokenlifeRenewalOverdue",
    "TokenlifeTokenExpired",
    "TokenlifeRenewalsFailing",
    "TokenlifeServiceTokensFailing",
    "TokenlifeDeliveryFailing",
    "TokenlifeStoreDown",
    "TokenlifeJobSourceDown",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    require_tool("promtool")
    return subprocess.run(
        ["promtool", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_each_alert_fires_when_it_should_and_only_then() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    # Every alert is tested firing (exp_alerts with labels) and silent ([]).
    text = RULE_TESTS.read_text()
    tested = set(re.findall(r"alertname: (\w+)", text))
    assert tested == ALERTS == set(re.findall(r"- alert: (\w+)", RULES.read_text()))
    silent, firing = set(), set()
    for case in re.split(r"\n\s+- eval_time:", text)[1:]:
        alert = re.search(r"alertname: (\w+)", case)
        assert alert is not None
        (silent if "exp_alerts: []" in case else firing).add(alert[1])
    assert silent == firing == ALERTS


def test_a_running_daemon_exposes_what_the_rules_use(tmp_path: Path) -> None:
    """``promtool check metrics`` finds nothing to say, and every tokenlife_*
    metric an alert reads is served (a renamed metric would silence it)."""
    require_tool("promtool")
    port = free_port()
    cfg = site(tmp_path, port)
    store = SqlTokenStore(f"sqlite:///{tmp_path}/db")
    mint_in_the_past(cfg, store, 3500)  # due: the first tick renews it
    store.engine.dispose()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([tokenlife_bin(), "-c", str(cfg), "serve"], stderr=log)
    try:
        text = ""

        def ticked() -> bool:
            nonlocal text
            try:
                text = scrape(port)
            except OSError:
                return False
            return parse(text)[("tokenlife_last_tick_success_timestamp_seconds", ())] > 0

        wait_for(ticked, 20)
        time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()

    check = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr

    served = {family.name for family in text_string_to_metric_families(text)}
    served |= {f"{name}_total" for name in served}  # a counter's family drops _total
    used = set(re.findall(r"\btokenlife_\w+", RULES.read_text()))
    assert used, "the rules read no tokenlife metric?"
    assert used <= served, f"the rules read metrics the daemon does not serve: {used - served}"
