"""What each ``tokenlife`` command does (imported only after parsing)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from typing import Any

from tokenlife import config as configmod
from tokenlife.app.site import Site
from tokenlife.config import Config
from tokenlife.errors import ConfigError, KeySourceError, TokenlifeError, UsageError
from tokenlife.interfaces import JobSource
from tokenlife.records import ACTIVE, EXPIRED, DeliveryRecord, TokenRecord
from tokenlife.users import validate_name


def _iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _config(args: argparse.Namespace) -> Config:
    return configmod.load(args.config)


def _site(args: argparse.Namespace) -> Site:
    return Site.from_config(_config(args), actor=_caller())


def mint(args: argparse.Namespace) -> int:
    validate_name(args.user)
    site = _site(args)
    config = site.config
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
        try:
            record, _ = site.minter.mint(args.user, os.getuid(), args.lifetime, args.renew_until)
        except KeySourceError as exc:
            refused = None if args.local else _refused(str(config.producer.socket))
            if refused is None:
                raise
            # The real trouble is the socket: say so, not only "key unreadable".
            raise type(exc)(
                f"the mint service at {config.producer.socket} refused uid {os.getuid()} "
                f"({refused}), and minting here needs the key: {exc}"
            ) from exc
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


def _refused(socket_path: str) -> str | None:
    """Why the mint socket refused this process (no permission), or None."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(socket_path)
        except PermissionError as exc:
            return exc.strerror or "permission denied"
        except OSError:
            return None
    return None


def renew(args: argparse.Namespace) -> int:
    if args.user:
        validate_name(args.user)
    site = Site.from_config(_config(args), actor="renewer")
    summary = site.renewer.tick(args.user, force=args.now)
    # After the renewal pass: new chains for the [[service]] accounts that need one.
    services = site.keeper.keep(args.user) if site.config.services else None
    return _print_summary(summary, args.json, "tokenlife-renew", services=services)


def _print_summary(
    summary: Any, as_json: bool, command: str, first: str = "", services: Any = None
) -> int:
    """The run's summary line (or JSON), its errors on stderr; exit 1 if any.

    ``first``: an error of the whole run, shown before the per-item ones;
    ``services``: the ``[[service]]`` accounts' part of the run (a second
    line; the JSON's ``services``).
    """
    errors = ([first] if first else []) + summary.errors
    if services is not None:
        errors += services.errors
    if as_json:
        extra = {} if services is None else {"services": services.as_dict()}
        print(json.dumps({**summary.as_dict(), **extra}, indent=2))
    else:
        print(summary.line())
        if services is not None:
            print(services.line())
        for error in errors:
            print(f"{command}: {error}", file=sys.stderr)
    failed = summary.failed or (services is not None and services.failed)
    return 1 if failed or first else 0


def rotate_key(args: argparse.Namespace) -> int:
    if args.user:
        validate_name(args.user)
    site = Site.from_config(_config(args), actor=f"rotate-key by {_caller()}")
    # Without --key: the configured key as its backend has it now, never a
    # cached copy (a new AWS secret version is picked up at once).
    new_source = site.fresh_key_source() if args.key is None else site.key_file_source(args.key)
    new_source.load()  # refuse a bad new key before anything is touched
    summary = site.renewer.rotate(new_source, args.user)
    return _print_summary(summary, args.json, "tokenlife-rotate-key")


def push(args: argparse.Namespace) -> int:
    if not args.job:
        return _push(args)
    # PrologSlurmctld: a non-zero exit would requeue and hold the job, so no
    # token problem may fail it; the regular cycle retries what is left.
    # The line is printed only once the except clause has let go of the
    # exception: a MemoryError's traceback holds on to what filled the
    # memory, and printing it there raised a second MemoryError that went
    # past every handler (exit 1 and a traceback).
    import contextlib

    failure: str | None = None
    try:
        _push(args)
    except MemoryError:
        failure = "out of memory"
    except Exception as exc:  # a bug here must not hold every job either
        try:
            failure = str(exc)
            if not isinstance(exc, TokenlifeError):
                failure = f"unexpected error: {type(exc).__name__}: {failure}"
        except Exception:  # an exception whose message cannot be made
            failure = f"unexpected error: {type(exc).__name__}"
    if failure is not None:
        with contextlib.suppress(Exception):
            print(f"tokenlife-push: {' '.join(failure.split())[:1000]}", file=sys.stderr)
    return 0


def _push(args: argparse.Namespace) -> int:
    import time

    from transfer.jobs import JobEnvironment, valid_node

    if args.user:
        validate_name(args.user)
    if args.node and not valid_node(args.node):
        raise UsageError(f"{args.node!r} is not a valid node name")
    site = _site(args)
    jobs: JobSource
    if args.job:
        job = JobEnvironment()
        jobs, user = job, job.user
        deadline: float | None = time.monotonic() + site.config.delivery.job_timeout
    else:
        jobs, user, deadline = site.jobs, args.user, None
    progress = _progress_bar if sys.stderr.isatty() and not args.json else None
    services = None
    try:
        summary = site.cycle(jobs).run(
            user, args.node, complete=not args.job, deadline=deadline, progress=progress
        )
        if site.config.services and not args.job:  # the [[service]] accounts' token files
            services = site.service_delivery().run(user, args.node)
        idle = summary.delivered + summary.unchanged + summary.removed + summary.failed == 0
        if services is not None:
            idle = idle and services.delivered + services.unchanged + services.failed == 0
        note = _nothing_owed(site, args.node, user) if args.node and idle else ""
    finally:
        site.close()
    if progress is not None:
        print(file=sys.stderr)
    first = summary.jobs_error or summary.store_error  # never both: see DeliveryCycle.run
    status = _print_summary(summary, args.json, "tokenlife-push", first, services)
    if note and not summary.unfinished:
        print(f"tokenlife-push: {args.node}: nothing owed: {note}", file=sys.stderr)
    return status


def _nothing_owed(site: Site, node: str, user: str | None) -> str:
    """Why ``push --node`` had nothing to do there: up to date, or unknown to the store."""
    records = [d for d in site.store.deliveries.deliveries(user) if d.node == node]
    if not records:
        return "no delivery record (the job source knows of no job of a known user there)"
    return f"its {len(records)} delivery record(s) are up to date"


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
    import errno
    import time

    from producer.loginfile import token_path
    from tokenlife.fsutil import remove_file
    from tokenlife.users import uid_of

    validate_name(args.user)
    site = _site(args)
    config, store = site.config, site.store
    # Before anything is committed: a user database that fails (UserDbError)
    # stops the command with nothing changed.
    uid = uid_of(args.user)
    now = int(time.time())
    count = store.renewals.set_state(args.user, "revoked", "revoked", site.actor, args.reason, now)
    if count == 0:
        raise TokenlifeError(f"{args.user} has no active token")
    nodes = store.deliveries.request_removal(args.user, now)
    # The revocation is committed: whatever happens to the login file now is
    # reported after the line that says so, never instead of it.
    removed, warning, error = False, "", ""
    if uid is not None:
        path = token_path(config.login.token_dir, uid)
        try:
            removed = remove_file(path)  # follows no symlink, removes no directory
        except IsADirectoryError:
            warning = f"{path} is a directory, not a token file: left in place"
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                warning = f"{path.parent} is not a directory (or is a symlink): nothing removed"
            else:
                error = f"the token file {path} could not be removed: {exc.strerror or exc}"
    print(
        f"revoked {count} token(s) of {args.user}"
        + ("; removed its token file" if removed else "")
        + (f"; removal from {nodes} node(s) queued" if nodes else ""),
        flush=True,
    )
    if warning:
        print(f"tokenlife-revoke: warning: {warning}", file=sys.stderr)
    if error:
        print(f"tokenlife-revoke: {error}", file=sys.stderr)
        return 1
    return 0


def purge(args: argparse.Namespace) -> int:
    import time

    site = _site(args)
    now = int(time.time())
    purged, dropped = site.store.purge(
        before=now - site.config.store.purge_after,
        events_before=now - args.events_older_than if args.events_older_than else None,
        actor=site.actor,
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
    import time

    from repository.store import superseded_ids

    if args.user:
        validate_name(args.user)
    store = _site(args).store
    records: list[TokenRecord] = store.records(args.user)
    by_user: dict[str, list[DeliveryRecord]] = {}
    for d in store.deliveries.deliveries(args.user):
        by_user.setdefault(d.user, []).append(d)
    # The store keeps a replaced token as "expired"; the audit trail knows it
    # was superseded, and Slurm accepts it until its exp all the same.
    superseded = superseded_ids(store, [r.token_id for r in records if r.state == EXPIRED])
    now = int(time.time())

    def state(r: TokenRecord) -> str:
        return "superseded" if r.token_id in superseded else r.state

    if args.json:
        out = []
        for r in records:
            nodes = by_user.get(r.user, []) if r.state == ACTIVE else []
            out.append(
                {
                    **r.public(),
                    "state": state(r),
                    "accepted_by_slurm": now <= r.exp,  # Slurm refuses only exp < now
                    "delivery": [d.public() for d in nodes],
                }
            )
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"{'USER':<16} {'STATE':<10} {'VER':>3} {'EXPIRES':<20} {'RENEW-UNTIL':<20} "
        f"{'NODES':<14} TOKEN-ID"
    )
    for r in records:
        column = _delivery_column(r, by_user.get(r.user, [])) if r.state == ACTIVE else "-"
        print(
            f"{r.user:<16} {state(r):<10} {r.version:>3} {_iso(r.exp):<20} "
            f"{_iso(r.renew_until):<20} {column:<14} {r.token_id}"
        )
    valid = sum(r.state != ACTIVE and now <= r.exp for r in records)
    if valid:
        print(
            f"note: {valid} token(s) no longer renewed are still accepted by Slurm until "
            "their EXPIRES time (Slurm has no revocation list)"
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
    site = _site(args)
    config, source = site.config, site.key_source
    report: dict[str, Any] = {
        "config": str(config.path or f"{configmod.DEFAULT_PATH} (absent: built-in defaults)"),
        "key_source": source.describe(),
        "store": config.store.url.split("@")[-1] if "@" in config.store.url else config.store.url,
        "login_token_dir": str(config.login.token_dir),
        "mint_socket": str(config.producer.socket),
        "token_kind": config.token.kind,
        "sinks": list(config.token.sinks),
        "transport": config.delivery.transport + ("" if site.pushes else " (push is off)"),
        "job_source": config.delivery.jobs,
        "pull": _pull_report(config),
    }
    warnings: list[str] = []
    if config.services:
        from repository.services import check_services

        # An unknown or refused account is a configuration error (exit 2), as at load.
        warnings = check_services(config)
        report["services"] = [f"{e.user}: {','.join(e.hosts)}:{e.path}" for e in config.services]
    problems = []
    try:
        report["key_id"] = source.load().key_id
    except TokenlifeError as exc:
        problems.append(f"key: {exc}")
    problems += _store_problems(config)
    problems += _pull_problems(config)
    if config.pull.login_hosts and config.pull.policy != "jobs":
        warnings.append("pull.login_hosts: ignored, pull.policy is not 'jobs'")
    report["problems"] = problems
    report["warnings"] = warnings
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, value in report.items():
            if name not in ("problems", "warnings"):
                print(f"{name}: {value}")
        for warning in warnings:
            print(f"warning: {warning}")
        for problem in problems:
            print(f"problem: {problem}")
        if not problems:
            print("ok")
    return 1 if problems else 0


def _pull_report(config: Config) -> str:
    """``off``, or where and how the pull service serves."""
    from producer.pull import DEFAULT_MUNGE_SOCKET

    pull = config.pull
    if not pull.listen:
        return "off"
    hosts = f" (login hosts: {', '.join(pull.login_hosts)})" if pull.login_hosts else ""
    socket = pull.munge_socket or f"{DEFAULT_MUNGE_SOCKET} (libmunge's default)"
    return f"{pull.listen}, policy {pull.policy}{hosts}, munge socket {socket}"


def _pull_problems(config: Config) -> list[str]:
    """What would keep the pull service from working: libmunge, and munged's socket."""
    import stat

    from producer.pull import DEFAULT_MUNGE_SOCKET
    from tokenlife import munge

    pull = config.pull
    if not pull.listen:
        return []
    if not munge.available():
        return [f"pull: cannot load {munge.LIBRARY} (install munge's library, libmunge2)"]
    path = pull.munge_socket or DEFAULT_MUNGE_SOCKET
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return [f"pull: munge socket {path}: {exc.strerror or exc} (is munged running?)"]
    if not stat.S_ISSOCK(mode):
        return [f"pull: munge socket {path}: not a socket"]
    return []


def _store_problems(config: Config) -> list[str]:
    """What is wrong with a SQLite store's files, without creating or opening it."""
    from tokenlife.config_values import sqlite_file

    path = sqlite_file(config.store.url)
    if path is None:
        return []
    from repository.store import check_sqlite_private

    try:
        check_sqlite_private(path)
    except TokenlifeError as exc:
        return [f"store: {exc}"]
    return []


def jwks(args: argparse.Namespace) -> int:
    from producer.keys import RS256Key

    site = _site(args)
    config = site.config
    if config.key.algorithm != "RS256":
        raise ConfigError(f"{config.path}: key.algorithm: jwks needs an RS256 key")
    key = site.key_source.load()
    if not isinstance(key, RS256Key):
        raise ConfigError(f"{config.path}: key.source: {config.key.source} gives no RS256 key")
    print(json.dumps(key.jwks(), indent=2))
    return 0


def serve(args: argparse.Namespace) -> int:
    from tokenlife.app.daemon import Daemon

    try:
        return Daemon(args.config, args.socket).run()
    except PermissionError as exc:
        # The key, the store and the config say so themselves; what is left
        # is a path (named) or the mint socket, whose bind names none.
        where = exc.filename or args.socket or _config(args).producer.socket
        raise TokenlifeError(
            f"cannot serve: {where}: {exc.strerror or 'permission denied'} (uid {os.geteuid()})"
        ) from exc


def demo(args: argparse.Namespace) -> int:
    from tokenlife.app.demo import run_demo

    return run_demo(keep=args.keep)
