"""``tokenlife-engine``: the worker-side commands.

``env`` is the TaskProlog's command and runs before every task, so it is
kept on a fast path: no argparse, no tokenlife.config, nothing outside the
standard library but two small modules of ours.
"""

from __future__ import annotations

import os
import sys
import time

from client_engine import wrappers
from client_engine.fallback import due, one_line, pull_now, refresh
from client_engine.tokens import Refused, Token, delivered_path, freshest
from tokenlife import engine_settings
from tokenlife.engine_settings import EXPORT_MODES, JOB_OVERRIDE, EngineSettings

PROG = "tokenlife-engine"
USAGE = f"""\
usage: {PROG} env
       {PROG} token
       {PROG} exec -- CMD [ARG...]
       {PROG} run [--on-change HOOK [--on-change-timeout S]] -- CMD [ARG...]
       {PROG} watch --file PATH [--timeout S] [--poll S] [--initial] -- HOOK [ARG...]
       {PROG} check [--time-limit T] [--quiet]
       {PROG} install-wrappers [DIR]
       {PROG} pull [--user USER]

Worker-node side of tokenlife: hands the token delivered to this node
(<engine.token_dir>/<uid>/slurm_jwt) to jobs, and keeps it fresh. With
engine.pull set, env, token, exec, check and run pull the token from the
token host (munge-authenticated) when that file is missing, invalid or near
its exp, and keep it there for the user's other tasks.

  env     for Slurm's TaskProlog: prints 'export SLURM_JWT_FILE=...', 'export
          SLURM_JWT=...' in the tasks that engine.export_jwt allows (every task
          by default), and 'export PATH=...' with the Slurm command wrappers
          first (srun, sstat, sattach and sbcast need munge, not JWT: their
          wrappers drop SLURM_JWT). Always exits 0.
  token   prints the freshest valid token for the caller; exit 1 if none
          (SLURM_JWT=$({PROG} token) squeue)
  exec    runs CMD with the freshest valid token in SLURM_JWT
  run     runs CMD for its whole life, keeping a per-job copy of the token
          fresh at $SLURM_JWT_FILE (krenew-style; signals are forwarded and
          CMD's exit status is returned); --on-change HOOK runs HOOK (one
          word) after each new token in that copy, killed after
          --on-change-timeout seconds (default 60; docs/hooks.md)
  watch   runs HOOK after each change of the token in PATH (a service account's
          token): one run per new valid token, never the token itself
          (TOKENLIFE_FILE, TOKENLIFE_EXP, TOKENLIFE_VERSION...); runs until
          SIGTERM. See docs/hooks.md
  check   exits 0 if the caller's token is valid and its renewable life lasts T (a
          Slurm time limit: MM, HH:MM:SS, D-HH:MM, UNLIMITED; default 0),
          3 if it ends sooner (log in again to start a new one), 1 if there
          is no valid token; one line says which (--quiet: only failures)
  install-wrappers
          (as root, on every node) writes the Slurm command wrappers into DIR
          (default: engine.wrapper_dir, {engine_settings.DEFAULT_WRAPPER_DIR})
  pull    pulls the caller's token into the token directory (engine.pull) unless
          the one there is valid and outside its advisory window; as root (the
          Slurm Prolog of pull-only nodes) for --user USER or the job's user
          (SLURM_JOB_UID), creating the user's directory; exit 1 if no valid
          token results

Environment: TOKENLIFE_CONFIG (config file, default {engine_settings.DEFAULT_CONFIG}),
{JOB_OVERRIDE}=always|steps|never (a job's own choice, overrides engine.export_jwt),
SLURM_JOB_UID/SLURM_JOB_USER (the job's user), SLURM_JWT, SLURM_JWT_FILE.
Exit status: 0 success, 1 no valid token (token, exec, check, pull), 2 usage or
configuration error, 3 the token will not last the time limit (check); exec and
run otherwise end with CMD's status. See docs/engine.md.
"""


def identity(environ: dict[str, str] | os._Environ[str]) -> tuple[int, str]:
    """(uid, user name) of the job's user: the caller, or the job's user for root."""
    uid = os.getuid()
    job_uid = environ.get("SLURM_JOB_UID", "")
    if job_uid:
        # ASCII digits only: int() also reads Arabic-Indic and other digits
        if not (job_uid.isascii() and job_uid.isdigit() and len(job_uid) <= 10):
            raise Refused(f"SLURM_JOB_UID={job_uid[:20]!r} is not a uid")
        if uid not in (0, int(job_uid)):
            raise Refused(f"SLURM_JOB_UID={job_uid} but running as uid {uid}")
        uid = int(job_uid)
        user = environ.get("SLURM_JOB_USER", "")
        if user:
            return uid, user
    import pwd

    try:
        return uid, pwd.getpwuid(uid).pw_name
    except KeyError:
        raise Refused(f"uid {uid} is not in the user database") from None


class BadConfig(Refused):
    """The configuration file is unreadable or wrong (exit status 2)."""


def load_settings() -> EngineSettings:
    try:
        return engine_settings.load()
    except ValueError as exc:
        raise BadConfig(str(exc)) from None


def env_lines(environ: dict[str, str] | os._Environ[str], now: float) -> list[str]:
    """What the TaskProlog prints for this task (see docs/engine.md)."""
    lines: list[str] = []
    try:
        settings = load_settings()
    except Refused as exc:
        lines.append(f"print {PROG}: {exc}; using the defaults")
        settings = EngineSettings()
    mode = environ.get(JOB_OVERRIDE) or settings.export_jwt
    if mode not in EXPORT_MODES:
        choices = "/".join(EXPORT_MODES)
        lines.append(f"print {PROG}: {JOB_OVERRIDE}={mode!r} is not one of {choices}")
        mode = settings.export_jwt
    path_line = None
    if mode != "never" and settings.wrapper_dir:
        path_line, trouble = _wrapped_path(environ, settings.wrapper_dir)
        if trouble:
            # Without wrappers, srun and sstat fail wherever SLURM_JWT is set:
            # keep it out of the batch step, where job scripts call them.
            lines.append(f"print {PROG}: {trouble}; SLURM_JWT only in srun steps")
            mode = "steps"
    wanted = mode == "always" or (mode == "steps" and "SLURM_STEP_ID" in environ)
    inherited = environ.get("SLURM_JWT")
    # The delivered file alone decides what is exported: an inherited token,
    # garbage or longer-lived, never hides it.
    keep_inherited = False
    pull_failed: Refused | None = None
    try:
        uid, user = identity(environ)
        path = delivered_path(settings.token_dir, uid)
        delivered, reasons = freshest([path], None, uid, user, now)
        if due(delivered, settings, now):  # missing, unusable, or in its mandatory window
            pull_failed = pull_now(settings, uid, user, delivered)
            delivered, reasons = freshest([path], None, uid, user, time.time())
        if delivered is None and wanted and inherited:
            keep_inherited = freshest([], inherited, uid, user, now)[0] is not None
    except Refused as exc:
        delivered, reasons = None, [str(exc)]
    if delivered is not None:
        lines.append(f"export SLURM_JWT_FILE={delivered.source}")
        if wanted:
            lines.append(f"export SLURM_JWT={delivered.value}")
        if pull_failed:
            left = max(0, int(delivered.exp - time.time()))
            lines.append(f"print {PROG}: {one_line(pull_failed)}; this token expires in {left}s")
    else:
        why = reasons[0] if reasons else "none"
        if pull_failed:
            why = f"{why}; {pull_failed}"
        lines.append(f"print {PROG}: no token for this job: {one_line(why)}")
    # Keep the submitter's token only where JWT is wanted, nothing was
    # delivered, and it is still good; an exported token replaces it.
    if inherited is not None and not (wanted and (delivered is not None or keep_inherited)):
        lines.append("unset SLURM_JWT")
    if path_line is not None:
        lines.append(path_line)
        if wrappers.DEPTH_VAR in environ:  # a new task starts a new count
            lines.append(f"unset {wrappers.DEPTH_VAR}")
    return lines


def _wrapped_path(
    environ: dict[str, str] | os._Environ[str], wrapper_dir: str
) -> tuple[str | None, str | None]:
    """(the 'export PATH=' line, None), or (None, why the wrappers cannot be used)."""
    trouble = wrappers.problem(wrapper_dir, os.getuid())
    if trouble:
        return None, trouble
    path = wrappers.task_path(wrapper_dir, environ.get("PATH"))
    if "\n" in path or "\r" in path:  # one line per setting: never split one
        return None, "PATH holds a line break: wrappers not used"
    return f"export PATH={path}", None


def _env(environ: os._Environ[str]) -> int:
    try:
        lines = env_lines(environ, time.time())
    except Exception as exc:  # a TaskProlog that fails kills the task: never
        lines = [f"print {PROG}: internal error ({type(exc).__name__}); no token for this job"]
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    return 0


def best_token(environ: dict[str, str] | os._Environ[str], now: float) -> Token:
    """The freshest valid token for the caller, or Refused with the first reason.

    With ``engine.pull`` set, the delivered file is first refreshed by a pull
    when it is missing, unusable or in its mandatory window; a pull that
    failed while a valid token remains is one warning line on stderr.
    """
    settings = load_settings()
    uid, user = identity(environ)
    pull_failed: Refused | None = None
    if settings.pull:
        pull_failed = refresh(settings, uid, user, now)
        now = time.time()  # a pull takes time: judge the tokens as of now
    paths = [environ["SLURM_JWT_FILE"]] if environ.get("SLURM_JWT_FILE") else []
    paths.append(delivered_path(settings.token_dir, uid))
    best, reasons = freshest(paths, environ.get("SLURM_JWT"), uid, user, now)
    if best is None:
        why = reasons[0] if reasons else "no token"
        raise Refused(one_line(f"{why}; {pull_failed}" if pull_failed else why))
    if pull_failed:
        left = max(0, int(best.exp - now))
        warning = f"warning: {one_line(pull_failed)}; using a token that expires in {left}s"
        print(f"{PROG}: {warning}", file=sys.stderr)
    return best


def _token(environ: os._Environ[str]) -> int:
    token = best_token(environ, time.time())
    sys.stdout.write(token.value + "\n")
    return 0


def _command(args: list[str], name: str) -> list[str]:
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        raise UsageError(f"{name} needs a command: {PROG} {name} -- CMD [ARG...]")
    return args


def _exec(environ: os._Environ[str], args: list[str]) -> int:
    command = _command(args, "exec")
    token = best_token(environ, time.time())
    child = dict(environ, SLURM_JWT=token.value)
    if token.source != "SLURM_JWT":
        child["SLURM_JWT_FILE"] = token.source
    try:
        os.execvpe(command[0], command, child)  # noqa: S606 - the user's own command
    except OSError as exc:
        print(f"{PROG}: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126


def _check(environ: os._Environ[str], args: list[str]) -> int:
    from client_engine import check

    try:
        limit, quiet = check.parse_args(args)
    except check.BadTimeLimit as exc:
        raise UsageError(str(exc)) from None
    now = time.time()
    try:
        token = best_token(environ, now)
    except BadConfig:
        raise
    except Refused as exc:
        raise Refused(f"no valid token: {exc}") from None
    status, line = check.verdict(token, limit, now)
    if status:
        print(f"{PROG}: {line}", file=sys.stderr)
    elif not quiet:
        print(f"{PROG}: {line}")
    return status


def _install_wrappers(args: list[str]) -> int:
    if len(args) > 1 or (args and not args[0].startswith("/")):
        raise UsageError(f"usage: {PROG} install-wrappers [DIR] (an absolute path)")
    settings = load_settings()
    directory = args[0].rstrip("/") if args else settings.wrapper_dir
    if not directory:
        raise UsageError("engine.wrapper_dir is empty (wrappers off): name a DIR")
    try:
        names = wrappers.install(directory, settings.slurm_bin_dir)
    except OSError as exc:
        raise BadConfig(f"{directory}: {exc.strerror or exc}") from None
    trouble = wrappers.problem(directory, os.getuid())
    if trouble:
        raise BadConfig(f"installed, but tasks will not use them: {trouble}")
    found = settings.slurm_bin_dir or f"in PATH after {directory}"
    print(f"{PROG}: {len(names)} Slurm wrappers in {directory} (real commands {found})")
    if settings.wrapper_dir != directory:
        print(f"{PROG}: tasks use engine.wrapper_dir ({settings.wrapper_dir or 'off'}): set it")
    return 0


def _pull(environ: os._Environ[str], args: list[str]) -> int:
    """``pull [--user USER]``: the user's token into the token directory, now.

    Root (the Slurm Prolog of a pull-only node) names the user with --user
    or SLURM_JOB_UID/SLURM_JOB_USER; the user's directory is then created
    (0700, theirs) and the pull runs as the user, whom munge must vouch for.
    Pulls when the delivered file is missing, unusable or in its advisory
    window; exit 0 when a valid token is in place afterwards.
    """
    from client_engine.check import span
    from client_engine.fallback import delivered

    name = _user_option(args)
    settings = load_settings()
    if not settings.pull:
        raise BadConfig("engine.pull is not set: there is no pull service to ask")
    if name is not None:
        uid, user = _named(name)
        if os.getuid() not in (0, uid):
            raise Refused(f"only root may pull for another user ({user})")
    elif os.getuid() == 0 and not environ.get("SLURM_JOB_UID"):
        raise UsageError("pull: as root, name the user: --user USER (or set SLURM_JOB_UID)")
    else:
        uid, user = identity(environ)
    now = time.time()
    current = delivered(settings, uid, user, now)
    failed = None
    if due(current, settings, now, advisory=True):
        failed = pull_now(settings, uid, user, current, advisory=True)
    now = time.time()
    token = delivered(settings, uid, user, now)
    path = delivered_path(settings.token_dir, uid)
    if token is None:
        raise Refused(one_line(failed) if failed else f"{path}: no valid token after the pull")
    if failed is not None:
        left = int(token.exp - now)
        warning = f"warning: {one_line(failed)}; keeping {path}, valid for {left}s"
        print(f"{PROG}: {warning}", file=sys.stderr)
    print(f"{PROG}: {path}: token for {user}, valid for {span(token.exp - now)}")
    return 0


def _user_option(args: list[str]) -> str | None:
    rest = list(args)
    name = None
    while rest:
        flag, eq, value = rest.pop(0).partition("=")
        if flag != "--user" or name is not None:
            raise UsageError(f"pull: unexpected {flag[:40]!r}; usage: {PROG} pull [--user USER]")
        if not eq:
            if not rest:
                raise UsageError("pull: --user needs a USER")
            value = rest.pop(0)
        name = value
    return name


def _named(name: str) -> tuple[int, str]:
    import pwd

    try:
        return pwd.getpwnam(name).pw_uid, name
    except (KeyError, ValueError):
        raise Refused(f"no user {name[:40]!r} in the user database") from None


def _run(environ: os._Environ[str], args: list[str]) -> int:
    from client_engine.hooks import parse_seconds
    from client_engine.supervisor import HOOK_TIMEOUT, supervise

    on_change: list[str] | None = None
    hook_timeout = HOOK_TIMEOUT
    rest = list(args)
    while rest and rest[0] != "--" and rest[0].startswith("-"):
        flag, eq, value = rest.pop(0).partition("=")
        if flag not in ("--on-change", "--on-change-timeout"):
            raise UsageError(f"run: unknown option {flag[:40]}")
        if not eq:
            if not rest or rest[0] == "--":
                raise UsageError(f"run: {flag} needs a value")
            value = rest.pop(0)
        if flag == "--on-change-timeout":
            try:
                hook_timeout = parse_seconds(flag, value)
            except ValueError as exc:
                raise UsageError(f"run: {exc}") from None
            continue
        if not value:
            raise UsageError("run: --on-change needs a HOOK")
        on_change = [value]
    command = _command(rest, "run")
    settings = load_settings()
    uid, user = identity(environ)
    return supervise(command, settings, uid, user, on_change=on_change, hook_timeout=hook_timeout)


class UsageError(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command, args = (argv[0], argv[1:]) if argv else ("", [])
    environ = os.environ
    if command == "env" and not args:
        return _env(environ)
    try:
        if command in ("-h", "--help", "help"):
            sys.stdout.write(USAGE)
            return 0
        if command == "token" and not args:
            return _token(environ)
        if command == "exec":
            return _exec(environ, args)
        if command == "run":
            return _run(environ, args)
        if command == "watch":
            from client_engine.watcher import watch_main

            return watch_main(environ, args)
        if command == "check":
            return _check(environ, args)
        if command == "install-wrappers":
            return _install_wrappers(args)
        if command == "pull":
            return _pull(environ, args)
        raise UsageError(f"unknown command line: {' '.join(argv) or '(none)'}; see --help")
    except (UsageError, BadConfig) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except Refused as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
