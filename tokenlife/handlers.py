"""What each ``tokenlife`` command does (imported only after parsing)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from tokenlife import config as configmod
from tokenlife.config import Config
from tokenlife.errors import ConfigError, TokenlifeError, UsageError
from tokenlife.model import ACTIVE, DeliveryRecord, TokenRecord
from tokenlife.users import validate_name

if TYPE_CHECKING:
    from repository.status import Snapshot


def _iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _config(args: argparse.Namespace) -> Config:
    return configmod.load(args.config)


def _store(config: Config) -> Any:
    from repository.store import SqlTokenStore

    spool = config.store.spool_dir if config.store.spool_dir.is_dir() else None
    return SqlTokenStore(config.store.url, spool)


def _minter(config: Config) -> Any:
    from producer.keys import make_key_source
    from producer.mint import Minter

    return Minter(
        config, make_key_source(config.key), _store(config), login_dir=config.login.token_dir
    )


def mint(args: argparse.Namespace) -> int:
    validate_name(args.user)
    config = _config(args)
    answer = None
    if not args.local:
        from producer.client import ask

        request = {
            "op": "mint",
            "user": args.user,
            "lifetime": args.lifetime,
            "renew_until": args.renew_until,
            "print": args.print,
        }
        answer = ask(str(config.producer.socket), request)
    if answer is not None:
        if not answer.get("ok"):
            error = TokenlifeError(str(answer.get("error")))
            error.exit_code = int(answer.get("code", 1))
            raise error
        public, token = answer["record"], answer.get("token", "")
    else:
        # The store opens lazily, after the user, the permission and the key
        # were checked: nothing is written for a request that cannot succeed.
        record, _ = _minter(config).mint(args.user, os.getuid(), args.lifetime, args.renew_until)
        public, token = record.public(), record.token
    if args.json:
        print(json.dumps({**public, **({"token": token} if args.print else {})}, indent=2))
    elif args.print:
        print(token)
    else:
        print(
            f"minted token {public['token_id']} for {public['user']}: expires "
            f"{_iso(public['exp'])}, renewable until {_iso(public['renew_until'])}"
        )
    return 0


def renew(args: argparse.Namespace) -> int:
    from producer.keys import make_key_source
    from repository.listeners import LoginFiles
    from repository.renewer import Renewer

    if args.user:
        validate_name(args.user)
    config = _config(args)
    renewer = Renewer(
        config,
        make_key_source(config.key),
        _store(config),
        listeners=[LoginFiles(config.login.token_dir)],
    )
    return _print_summary(renewer.tick(args.user, force=args.now), args.json, "tokenlife-renew")


def _print_summary(summary: Any, as_json: bool, command: str, first: str = "") -> int:
    """The run's summary line (or JSON), its errors on stderr; exit 1 if any.

    ``first``: an error of the whole run, shown before the per-item ones.
    """
    errors = ([first] if first else []) + summary.errors
    if as_json:
        print(json.dumps(summary.as_dict(), indent=2))
    else:
        print(summary.line())
        for error in errors:
            print(f"{command}: {error}", file=sys.stderr)
    return 1 if summary.failed or first else 0


def rotate_key(args: argparse.Namespace) -> int:
    import dataclasses

    from producer.keys import make_key_source
    from repository.listeners import LoginFiles
    from repository.renewer import Renewer

    if args.user:
        validate_name(args.user)
    config = _config(args)
    new_config = config.key
    if args.key is not None:
        new_config = dataclasses.replace(config.key, source="file", path=args.key, kid=None)
    new_source = make_key_source(new_config)
    new_source.load()  # refuse a bad new key before anything is touched
    renewer = Renewer(
        config,
        make_key_source(config.key),
        _store(config),
        listeners=[LoginFiles(config.login.token_dir)],
        actor=f"rotate-key by {_caller()}",
    )
    return _print_summary(renewer.rotate(new_source, args.user), args.json, "tokenlife-rotate-key")


def push(args: argparse.Namespace) -> int:
    if not args.job:
        return _push(args)
    # PrologSlurmctld: a non-zero exit would requeue and hold the job, so no
    # token problem may fail it; the regular cycle retries what is left.
    try:
        _push(args)
    except TokenlifeError as exc:
        print(f"tokenlife-push: {exc}", file=sys.stderr)
    except Exception as exc:  # a bug here must not hold every job either
        print(f"tokenlife-push: unexpected error: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 0


def _push(args: argparse.Namespace) -> int:
    import time

    from transfer.cycle import DeliveryCycle
    from transfer.jobs import JobEnvironment, JobSource, SlurmJobs, StaticJobs, valid_node
    from transfer.transports import make_transport

    if args.user:
        validate_name(args.user)
    if args.node and not valid_node(args.node):
        raise UsageError(f"{args.node!r} is not a valid node name")
    config = _config(args)
    d = config.delivery
    jobs: JobSource
    if args.job:
        job = JobEnvironment()
        jobs, user, deadline = job, job.user, time.monotonic() + d.job_timeout
    else:
        jobs = StaticJobs(d.static) if d.jobs == "static" else SlurmJobs()
        user, deadline = args.user, None
    transport = make_transport(d)
    progress = _progress_bar if sys.stderr.isatty() and not args.json else None
    try:
        cycle = DeliveryCycle(
            _store(config), transport, jobs, d.remove_after, d.ssh.concurrency, actor=_caller()
        )
        summary = cycle.run(
            user, args.node, complete=not args.job, deadline=deadline, progress=progress
        )
    finally:
        transport.close()
    if progress is not None:
        print(file=sys.stderr)
    return _print_summary(summary, args.json, "tokenlife-push", summary.jobs_error)


def _progress_bar(done: int, total: int) -> None:
    width = 30
    filled = width * done // total
    print(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} nodes",
        end="",
        file=sys.stderr,
        flush=True,
    )


def _caller() -> str:
    from tokenlife.users import describe_uid

    return describe_uid(os.getuid())


def revoke(args: argparse.Namespace) -> int:
    import time

    from producer.loginfile import token_path
    from repository.delivery_store import DeliveryStore
    from repository.renewal_store import RenewalStore
    from tokenlife.fsutil import remove_file
    from tokenlife.users import uid_of

    validate_name(args.user)
    config = _config(args)
    store = _store(config)
    actor = _caller()
    now = int(time.time())
    count = RenewalStore(store).set_state(args.user, "revoked", "revoked", actor, args.reason, now)
    if count == 0:
        raise TokenlifeError(f"{args.user} has no active token")
    nodes = DeliveryStore(store).request_removal(args.user, now)
    uid = uid_of(args.user)
    removed = uid is not None and remove_file(token_path(config.login.token_dir, uid))
    print(
        f"revoked {count} token(s) of {args.user}"
        + ("; removed its token file" if removed else "")
        + (f"; removal from {nodes} node(s) queued" if nodes else "")
    )
    return 0


def purge(args: argparse.Namespace) -> int:
    import time

    config = _config(args)
    now = int(time.time())
    purged, dropped = _store(config).purge(
        before=now - config.store.purge_after,
        events_before=now - args.events_older_than if args.events_older_than else None,
        actor=_caller(),
        now=now,
        dry_run=args.dry_run,
    )
    verb = "would purge" if args.dry_run else "purged"
    if args.json:
        print(
            json.dumps(
                {
                    "dry_run": args.dry_run,
                    "tokens": [r.public() for r in purged],
                    "events": dropped,
                },
                indent=2,
            )
        )
    else:
        for record in purged:
            print(
                f"{verb} {record.user} token {record.token_id} v{record.version} "
                f"(renew-until {_iso(record.renew_until)}, {record.state})"
            )
        print(
            f"{verb} {len(purged)} token(s)" + (f" and {dropped} audit event(s)" if dropped else "")
        )
    return 0


def list_tokens(args: argparse.Namespace) -> int:
    if args.user:
        validate_name(args.user)
    from repository.delivery_store import DeliveryStore

    store = _store(_config(args))
    records: list[TokenRecord] = store.records(args.user)
    by_user: dict[str, list[DeliveryRecord]] = {}
    for d in DeliveryStore(store).deliveries(args.user):
        by_user.setdefault(d.user, []).append(d)
    if args.json:
        out = []
        for r in records:
            nodes = by_user.get(r.user, []) if r.state == ACTIVE else []
            out.append({**r.public(), "delivery": [d.public() for d in nodes]})
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"{'USER':<16} {'STATE':<8} {'VER':>3} {'EXPIRES':<20} {'RENEW-UNTIL':<20} "
        f"{'NODES':<14} TOKEN-ID"
    )
    for r in records:
        column = _delivery_column(r, by_user.get(r.user, [])) if r.state == ACTIVE else "-"
        print(
            f"{r.user:<16} {r.state:<8} {r.version:>3} {_iso(r.exp):<20} "
            f"{_iso(r.renew_until):<20} {column:<14} {r.token_id}"
        )
    return 0


def _delivery_column(record: TokenRecord, deliveries: list[DeliveryRecord]) -> str:
    """ "2/3 current, 1 failed": how many nodes hold this version, of those that need it."""
    needed = [d for d in deliveries if d.status != "removing"]
    if not needed:
        return "-"
    text = f"{sum(d.holds(record) for d in needed)}/{len(needed)} current"
    failed = sum(d.status == "failed" for d in needed)
    return text + (f", {failed} failed" if failed else "")


def config(args: argparse.Namespace) -> int:
    if args.config_command == "sample":
        from importlib.resources import files

        sys.stdout.write(files("tokenlife").joinpath("data/tokenlife.toml").read_text())
        return 0
    return config_check(args)


def config_check(args: argparse.Namespace) -> int:
    from producer.keys import make_key_source

    config = _config(args)
    source = make_key_source(config.key)
    report: dict[str, Any] = {
        "config": str(config.path or f"{configmod.DEFAULT_PATH} (absent: built-in defaults)"),
        "key_source": source.describe(),
        "store": config.store.url.split("@")[-1] if "@" in config.store.url else config.store.url,
        "login_token_dir": str(config.login.token_dir),
        "mint_socket": str(config.producer.socket),
    }
    problems = []
    try:
        report["key_id"] = source.load().key_id
    except TokenlifeError as exc:
        problems.append(f"key: {exc}")
    report["problems"] = problems
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, value in report.items():
            if name != "problems":
                print(f"{name}: {value}")
        for problem in problems:
            print(f"problem: {problem}")
        if not problems:
            print("ok")
    return 1 if problems else 0


def jwks(args: argparse.Namespace) -> int:
    from producer.keys import FileKeySource, RS256Key

    config = _config(args)
    if config.key.algorithm != "RS256":
        raise ConfigError(f"{config.path}: key.algorithm: jwks needs an RS256 key")
    key = FileKeySource(config.key).load()
    assert isinstance(key, RS256Key)
    print(json.dumps(key.jwks(), indent=2))
    return 0


def status(args: argparse.Namespace) -> int:
    import time

    from repository.status import snapshot

    config = _config(args)
    snap = snapshot(_store(config), int(time.time()))  # StoreError: exit 6
    daemon = _daemon_status(config.serve.metrics)
    if args.json:
        print(json.dumps({**snap.as_dict(), "daemon": daemon}, indent=2))
        return 0
    for label, text in _status_lines(snap, daemon, config.serve.interval):
        print(f"{label:<12}{text}")
    return 0


def _daemon_status(address: str) -> dict[str, Any] | None:
    """What the running daemon's metrics endpoint says; None if serve.metrics is off."""
    if not address:
        return None
    from repository.status import one_line
    from tokenlife.metrics import metrics_url, read_last_tick

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
    snap: Snapshot, daemon: dict[str, Any] | None, interval: int
) -> list[tuple[str, str]]:
    """(label, text) per line of ``tokenlife status``."""
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

    events = dict(snap.events)
    counts = [f"{events.pop('renewed', 0)} renewed", f"{events.pop('failed', 0)} failed"]
    counts += [f"{n} {kind}" for kind, n in sorted(events.items())]
    text = ", ".join(counts)
    if snap.last_renewal is not None:
        text += f"; last renewal {span(snap.now - snap.last_renewal)} ago"
    lines.append(("last 24h", text))

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


def serve(args: argparse.Namespace) -> int:
    from tokenlife.daemon import Daemon

    return Daemon(args.config, args.socket).run()


def demo(args: argparse.Namespace) -> int:
    from tokenlife.demo import run_demo

    return run_demo(keep=args.keep)
