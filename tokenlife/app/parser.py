"""Argument parsing and the top-level error handler of ``tokenlife``."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from tokenlife import __version__
from tokenlife.app.argv import subcommand
from tokenlife.durations import parse_duration
from tokenlife.errors import TokenlifeError, UsageError, exit_status_line

log = logging.getLogger("tokenlife")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other error; usage is in --help.
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _duration(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="tokenlife",
        description="Kerberos-style lifecycle for Slurm JWTs: mint, store, renew, deliver.",
        epilog=f"Exit status: {exit_status_line()}.  See docs/commands.md.",
    )
    p.add_argument(
        "-c",
        "--config",
        type=Path,
        help="config file (default: $TOKENLIFE_CONFIG or /etc/tokenlife/tokenlife.toml)",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    p.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    p.add_argument("--version", action="version", version=f"tokenlife {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    m = sub.add_parser(
        "mint",
        help="mint a token for USER, store it, write the login token file",
        description="Mint a Slurm JWT for USER (yourself unless you are root, "
        "the Slurm user or an admin), store it and write "
        "<login.token_dir>/<uid>/slurm_jwt.  The token is printed only with --print.",
    )
    m.add_argument("user", metavar="USER", help="user name (must exist in the user database)")
    m.add_argument(
        "--lifetime", type=_duration, metavar="D", help="token lifetime (default token.lifetime)"
    )
    m.add_argument(
        "--renew-until",
        type=_duration,
        metavar="D",
        help="renewal limit from now (default token.renew_until)",
    )
    m.add_argument("--print", action="store_true", help="print the token on stdout")
    m.add_argument("--json", action="store_true", help="print the record as JSON")
    m.add_argument(
        "--local",
        action="store_true",
        help="mint in this process even if the mint service is running",
    )

    pam = sub.add_parser(
        "pam", help="pam_exec entry, and pam_tokenlife.so's fallback (reads PAM_USER, PAM_TYPE)"
    )
    pam.add_argument("--socket", metavar="PATH", help="the mint service's socket")
    pam.add_argument(
        "--no-service",
        action="store_true",
        help="do not ask the mint service (pam_tokenlife.so asked already)",
    )

    rn = sub.add_parser(
        "renew",
        help="one renewal tick (what the systemd timer runs)",
        description="Renew every token in its renewal window (last quarter of its lifetime, "
        "at least token.renew_before ahead of exp), never past renew-until; expire those past "
        "it.  Prints a summary; exits 1 if any renewal failed.",
    )
    rn.add_argument("--user", help="only this user's token")
    rn.add_argument("--now", action="store_true", help="treat every renewable token as due")
    rn.add_argument("--json", action="store_true", help="print the summary as JSON")

    rk = sub.add_parser(
        "rotate-key",
        help="re-mint every live token with the new signing key",
        description="Re-mint every active token that is not yet signed by the new key "
        "(the configured one, or --key), keeping its renew-until; refresh login token files.  "
        "Safe to re-run.  See docs/rotation.md for the procedure around slurmctld.",
    )
    rk.add_argument(
        "--key", type=Path, metavar="FILE", help="the new key file (default: the configured key)"
    )
    rk.add_argument("--user", help="only this user's token")
    rk.add_argument("--json", action="store_true", help="print the summary as JSON")

    ps = sub.add_parser(
        "push",
        help="deliver current tokens to the nodes where their users have work",
        description="One delivery cycle: ask the job source (delivery.jobs) who runs where, "
        "push each user's newest token to the nodes that need it, remove tokens from nodes "
        "whose work ended more than delivery.remove_after ago.  Prints a summary; exits 1 if "
        "a node failed (it is retried with backoff by the next cycle).",
    )
    ps.add_argument("--user", help="only this user's deliveries")
    ps.add_argument("--node", help="only this node")
    ps.add_argument(
        "--job",
        action="store_true",
        help="PrologSlurmctld mode: deliver SLURM_JOB_USER's token to SLURM_JOB_NODELIST now, "
        "wait at most delivery.job_timeout, always exit 0",
    )
    ps.add_argument("--json", action="store_true", help="print the summary as JSON")

    rv = sub.add_parser("revoke", help="stop renewing USER's token and remove its token file")
    rv.add_argument("user", metavar="USER", help="whose active token to revoke")
    rv.add_argument("--reason", default="", metavar="TEXT", help="recorded in the audit trail")

    pg = sub.add_parser(
        "purge",
        help="delete tokens past their renew-until plus store.purge_after",
        description="Delete stored tokens whose renew-until lies more than store.purge_after "
        "(default 7d) in the past, in any state; each deletion is audited.  The audit trail "
        "is kept unless --events-older-than is given.",
    )
    pg.add_argument(
        "--events-older-than",
        type=_duration,
        metavar="D",
        help="also drop audit events older than D",
    )
    pg.add_argument("--dry-run", action="store_true", help="show what would be deleted")
    pg.add_argument("--json", action="store_true", help="print the result as JSON")

    ls = sub.add_parser(
        "list",
        help="stored tokens with delivery status (never the token itself)",
        description="Stored tokens: state, version, exp, renew-until and, for active tokens, "
        "how many of the nodes that need the token hold its current version (NODES).",
    )
    ls.add_argument("--user", help="only this user's tokens")
    ls.add_argument("--json", action="store_true", help="print the records as JSON")

    st = sub.add_parser(
        "status",
        help="tokens, renewals, deliveries and the daemon at a glance (never a token)",
        description="What the store says, counted by the database: tokens per state, the "
        "active token that expires first, renewals and failures of the last 24 h, deliveries "
        "per status with the nodes that wait or fail, and, when serve.metrics is set, the "
        "running daemon's last successful tick (read from its metrics endpoint; one that does "
        "not answer is reported, not an error).  Exit status 0; 6 if the store cannot be read.",
    )
    st.add_argument("--json", action="store_true", help="print one JSON object")

    serve = sub.add_parser(
        "serve",
        help="run the service (mint socket) in the foreground",
        description="The mint socket, plus a renewal tick (then a delivery cycle) at start and "
        "every serve.interval; Prometheus metrics on serve.metrics (see docs/commands.md).  "
        "SIGALRM ticks now, SIGHUP reloads the configuration, SIGTERM stops.",
    )
    serve.add_argument("--socket", type=Path, metavar="PATH", help="override producer.socket")

    cfg = sub.add_parser("config", help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="SUBCOMMAND", parser_class=_Parser)
    cfg_sub.required = True
    check = cfg_sub.add_parser("check", help="validate the config and show the backends in use")
    check.add_argument("--json", action="store_true", help="print the result as JSON")
    cfg_sub.add_parser(
        "sample",
        help="print the sample configuration (every key, its default, a comment)",
        description="Print the sample tokenlife.toml installed with the package: every key "
        "set, live, to its default, with a comment each. Start a site's file with "
        "'tokenlife config sample > /etc/tokenlife/tokenlife.toml'.",
    )

    sub.add_parser("jwks", help="print the JWKS (public key) for Slurm's jwks= (RS256 keys)")
    demo = sub.add_parser("demo", help="the lifecycle on this machine, in a temp dir, narrated")
    demo.add_argument("--keep", action="store_true", help="keep the temp dir")
    return p


def _handler(command: str) -> Callable[[argparse.Namespace], int]:
    from tokenlife.app import handlers, status

    return {
        "mint": handlers.mint,
        "list": handlers.list_tokens,
        "renew": handlers.renew,
        "revoke": handlers.revoke,
        "rotate-key": handlers.rotate_key,
        "purge": handlers.purge,
        "push": handlers.push,
        "serve": handlers.serve,
        "status": status.status,
        "config": handlers.config,
        "jwks": handlers.jwks,
        "demo": handlers.demo,
    }[command]


def run(argv: list[str]) -> int:
    sub = subcommand(argv)
    command = f"tokenlife-{sub}" if sub else "tokenlife"
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        from tokenlife import logsetup

        logsetup.setup(args.verbose, args.debug)
        return _handler(args.command)(args)
    except TokenlifeError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            traceback.print_exc()
        print(f"{command}: unexpected error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
