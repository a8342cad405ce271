"""``tokenlife status``: what the store says, and whether the daemon ticks."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from tokenlife import config as configmod
from tokenlife.app.site import Site

if TYPE_CHECKING:
    from repository.status import Snapshot


def status(args: argparse.Namespace) -> int:
    import time

    from repository.status import snapshot

    config = configmod.load(args.config)
    store = Site.from_config(config).store
    snap = snapshot(store, int(time.time()))  # StoreError: exit 6
    services: list[dict[str, Any]] = []
    if config.services:
        from repository.services import service_status

        services = service_status(store, config.services, snap.now)
    daemon = _daemon_status(config.serve.metrics)
    if args.json:
        extra = {"services": services} if config.services else {}
        print(json.dumps({**snap.as_dict(), "daemon": daemon, **extra}, indent=2))
        return 0
    for label, text in _status_lines(snap, daemon, config.serve.interval, bool(config.pull.listen)):
        print(f"{label:<12}{text}")
    for service in services:
        print(f"{'service':<12}{_service_line(service, snap.now)}")
    return 0


def _service_line(service: dict[str, Any], now: int) -> str:
    """``slurmweb: v3 expires in 1h (chain until ...); node01 current 2m ago, node02 never``."""
    from tokenlife.durations import format_duration as span

    token = service["token"]
    if token is None:
        text = f"{service['user']}: no active token"
    else:
        left = token["seconds_left"]
        when = f"expires in {span(left)}" if left > 0 else f"expired {span(-left)} ago"
        text = (
            f"{service['user']}: v{token['version']} {when}, chain until "
            f"{datetime.fromtimestamp(token['renew_until'], UTC).strftime('%Y-%m-%d %H:%M:%S UTC')}"
        )
    hosts = []
    for host, last in service["hosts"].items():
        if last is None:
            hosts.append(f"{host} never")
            continue
        held = "current" if last["current"] else f"v{last['version']} of {last['token_id']}"
        hosts.append(f"{host} {held} ({span(max(0, now - last['at']))} ago)")
    return f"{text}; {service['path']}: {', '.join(hosts)}"


def _daemon_status(address: str) -> dict[str, Any] | None:
    """What the running daemon's metrics endpoint says; None if serve.metrics is off."""
    if not address:
        return None
    from repository.status import one_line
    from tokenlife.app.metrics import metrics_url, read_last_tick

    url = metrics_url(address)
    try:
        last = int(read_last_tick(url))
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc  # urllib wraps the socket's error
        text = reason.strerror if isinstance(reason, OSError) and reason.strerror else reason
        return {
            "url": url,
            "reachable": False,
            "last_tick_success": None,
            "error": one_line(str(text)),
        }
    return {"url": url, "reachable": True, "last_tick_success": last or None, "error": ""}


def _status_lines(
    snap: Snapshot, daemon: dict[str, Any] | None, interval: int, pull: bool = False
) -> list[tuple[str, str]]:
    """(label, text) per line of ``tokenlife status``; ``pull``: the pull service is on."""
    from repository.pull_audit import RESULT_OF
    from tokenlife.durations import format_duration as span

    def when(epoch: int) -> str:
        return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

    lines = [("tokens", ", ".join(f"{n} {state}" for state, n in snap.tokens.items()))]
    d = snap.soonest_exp
    if d is None:
        lines.append(("soonest", "no active token"))
    elif d.seconds_left > 0:
        lines.append(("soonest", f"{d.user}: expires in {span(d.seconds_left)} ({when(d.at)})"))
    else:
        lines.append(("soonest", f"{d.user}: expired {span(-d.seconds_left)} ago ({when(d.at)})"))
    d = snap.soonest_renew_until
    if d is not None:
        lines.append(
            ("renew-until", f"{d.user}: renewable for {span(d.seconds_left)} ({when(d.at)})")
        )

    # The pulls have a line of their own (below), by result.
    events = {kind: n for kind, n in snap.events.items() if kind not in RESULT_OF}
    counts = [f"{events.pop('renewed', 0)} renewed", f"{events.pop('failed', 0)} failed"]
    counts += [f"{n} {kind}" for kind, n in sorted(events.items())]
    text = ", ".join(counts)
    if snap.last_renewal is not None:
        text += f"; last renewal {span(snap.now - snap.last_renewal)} ago"
    lines.append(("last 24h", text))
    pulls = snap.pulls
    if pull or any(pulls.values()):
        shown = [f"{n} {result}" for result, n in pulls.items() if n or result == "ok"]
        lines.append(("pulls", f"{', '.join(shown)} in the last 24h"))

    parts = []
    for state, n in snap.deliveries.items():
        if n or state in ("delivered", "failed"):
            parts.append(f"{n} {state}{_delivery_nodes(snap, state)}")
    lines.append(("deliveries", ", ".join(parts)))

    if daemon is None:
        text = "not asked: serve.metrics is off"
    elif not daemon["reachable"]:
        text = f"not reachable at {daemon['url']} ({daemon['error']})"
    elif daemon["last_tick_success"] is None:
        text = f"no successful tick yet ({daemon['url']})"
    else:
        age = max(0, snap.now - daemon["last_tick_success"])
        late = f"; late, it ticks every {span(interval)}" if age > 2 * interval + 60 else ""
        text = f"last successful tick {span(age)} ago ({daemon['url']}{late})"
    lines.append(("daemon", text))
    return lines


def _delivery_nodes(snap: Snapshot, state: str) -> str:
    """`` (node07, node08)`` for pending, `` (node09: error; ...)`` for failed."""
    if state == "pending":
        items, limit, sep = [n for n, t in sorted(snap.nodes.items()) if t.pending], 5, ", "
    elif state == "failed":
        items = [
            f"{n}: {t.error.removeprefix(f'{n}: ')}" if t.error else n
            for n, t in sorted(snap.nodes.items())
            if t.failed
        ]
        limit, sep = 3, "; "
    else:
        return ""
    if not items:
        return ""
    shown = items[:limit] + ([f"+{len(items) - limit} more"] if len(items) > limit else [])
    return f" ({sep.join(shown)})"
