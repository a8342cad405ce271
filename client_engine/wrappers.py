"""Slurm command wrappers: ``SLURM_JWT`` in every step without breaking ``srun``.

Any Slurm client that sees ``SLURM_JWT`` authenticates with JWT only, and
slurmd accepts munge only, so ``srun``, ``sstat``, ``sattach`` and ``sbcast``
fail in a task that has the variable (Slurm 26.05's srun even refuses to
start).  The TaskProlog puts a root-owned directory of small ``/bin/sh``
wrappers first in every task's ``PATH``:

* the wrappers of the commands that talk to slurmd drop ``SLURM_JWT`` and run
  the real command, which then uses munge as it would without tokenlife;
* the wrappers of the commands that talk to slurmctld or slurmdbd replace a
  stale ``SLURM_JWT`` with the token in ``$SLURM_JWT_FILE`` when that one is
  for the same user and expires later (transfer and ``tokenlife-engine run``
  keep that file fresh; the variable was captured when the task started).  A
  ``SLURM_JWT`` the user set to another identity, or to garbage, is left as is.

The real command is ``engine.slurm_bin_dir/NAME`` when that is set, else the
first ``NAME`` in ``PATH`` after the wrappers' directory that is not a wrapper.
A site wrapper that runs ``NAME`` by ``PATH`` would come back here: a depth
counter in the environment stops such a loop with a message.

Shell, not Python: a wrapper is on the path of every Slurm command in every
job, and ``/bin/sh`` starts in about a millisecond where Python needs
twenty.  The steady state (the variable matches the file) runs no other
program; after a renewal, one ``awk`` compares the two tokens' claims.  The
token never appears on a command line (other users can read those in
``/proc``): ``awk`` gets it through its environment.

This module is imported by ``tokenlife-engine env`` on every task, so it
keeps to the standard library and does nothing at import time.
"""

from __future__ import annotations

import os
import stat

#: commands that talk to slurmd (task launch, step I/O, stats, broadcast): munge only
SLURMD_COMMANDS = ("sattach", "sbcast", "srun", "sstat")
#: commands that talk to slurmctld or slurmdbd, where JWT is accepted
CONTROLLER_COMMANDS = (
    "sacct",
    "sacctmgr",
    "salloc",
    "sbatch",
    "scancel",
    "scontrol",
    "scrontab",
    "sdiag",
    "sinfo",
    "sprio",
    "squeue",
    "sreport",
    "sshare",
    "strigger",
)
COMMANDS = SLURMD_COMMANDS + CONTROLLER_COMMANDS
#: written last by install(): its presence says the set is complete
MARKER = ".tokenlife-wrappers"
FORMAT = "tokenlife slurm wrappers 1"
#: counts wrapper levels; the TaskProlog resets it in every task
DEPTH_VAR = "TOKENLIFE_WRAPPER_DEPTH"
#: PATH for a task that has none (srun --export=NONE, say)
FALLBACK_PATH = "/usr/local/bin:/usr/bin:/bin"

# Prints TOKENLIFE_NEW_JWT when it is for the same user as SLURM_JWT and
# expires later.  No single quotes in here: the script quotes it with them.
_NEWER_AWK = r"""
function payload(tok,   rest) {
  if (tok !~ /^[A-Za-z0-9_-]+[.][A-Za-z0-9_-]+[.][A-Za-z0-9_-]+$/) return ""
  rest = substr(tok, index(tok, ".") + 1)
  return decode(substr(rest, 1, index(rest, ".") - 1))
}
function decode(s,   i, v, acc, bits, c, out) {
  acc = 0; bits = 0; out = ""
  for (i = 1; i <= length(s); i++) {
    v = index(ALPHABET, substr(s, i, 1)) - 1
    acc = acc * 64 + v; bits += 6
    if (bits >= 8) {
      bits -= 8; c = int(acc / POW[bits]); acc -= c * POW[bits]
      out = out ((c > 31 && c < 127) ? sprintf("%c", c) : "?")
    }
  }
  return out
}
function number(json, key,   s) {
  if (!match(json, "\"" key "\"[ \t]*:[ \t]*[0-9]+")) return -1
  s = substr(json, RSTART, RLENGTH); sub(/^.*:[ \t]*/, "", s)
  return s + 0
}
function user(json,   s) {
  if (!match(json, /"sun"[ \t]*:[ \t]*"[^"\\]*"/) \
      && !match(json, /"username"[ \t]*:[ \t]*"[^"\\]*"/)) return ""
  s = substr(json, RSTART, RLENGTH); sub(/^[^:]*:[ \t]*"/, "", s); sub(/"$/, "", s)
  return s
}
BEGIN {
  ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
  POW[0] = 1; for (i = 1; i < 8; i++) POW[i] = POW[i - 1] * 2
  old = payload(ENVIRON["SLURM_JWT"]); new = payload(ENVIRON["TOKENLIFE_NEW_JWT"])
  if (old == "" || new == "" || user(new) == "" || user(new) != user(old)) exit 1
  if (number(new, "exp") > number(old, "exp")) print ENVIRON["TOKENLIFE_NEW_JWT"]
}
"""

_HEAD = """\
#!/bin/sh
# tokenlife: wrapper for Slurm's {name}, written by 'tokenlife-engine install-wrappers'
# (the next install rewrites it: do not edit). Why and how: docs/engine.md.
set -f
n={name}
case ${{{depth}:-0}} in
[0-8]) {depth}=$(( ${{{depth}:-0}} + 1 )); export {depth} ;;
*) echo "tokenlife: $n: its wrapper in {wrapper_dir} runs in a loop (a site wrapper that" \\
     "runs $n by PATH?): set [engine] slurm_bin_dir, then run tokenlife-engine" \\
     "install-wrappers again" >&2; exit 126 ;;
esac
"""

_DROP = """\
# {name} talks to slurmd, which accepts munge only.
unset SLURM_JWT
"""

_REFRESH = """\
# {name} talks to slurmctld/slurmdbd: use the newer token of SLURM_JWT_FILE.
if [ -n "${{SLURM_JWT-}}" ] && [ -n "${{SLURM_JWT_FILE-}}" ] && [ -f "$SLURM_JWT_FILE" ] \\
   && [ -O "$SLURM_JWT_FILE" ]; then
  t=
  read -r t 2>/dev/null <"$SLURM_JWT_FILE"
  if [ -n "$t" ] && [ "$t" != "$SLURM_JWT" ]; then
    t=$(TOKENLIFE_NEW_JWT=$t awk '{awk}' </dev/null 2>/dev/null) && [ -n "$t" ] && SLURM_JWT=$t
  fi
  unset t
fi
"""

_FIND_IN_BIN = """\
real={bin}/$n
"""

_FIND_IN_PATH = """\
real=
IFS=:
for d in ${{PATH-}}; do
  case $d in /*) ;; *) continue ;; esac  # never a relative entry (the working directory)
  [ "$d" -ef {wrapper_dir} ] && continue
  if [ -f "$d/$n" ] && [ -x "$d/$n" ] && ! [ "$d/$n" -ef "$0" ]; then real=$d/$n; break; fi
done
unset IFS d
if [ -z "$real" ]; then
  echo "$n: command not found (tokenlife: nothing after {wrapper_dir} in PATH)" >&2
  exit 127
fi
"""

_EXEC = """\
exec "$real" "$@"
"""


def script(name: str, wrapper_dir: str, slurm_bin_dir: str = "") -> str:
    """The wrapper for ``name``; both directories are plain absolute paths (config-checked)."""
    if name not in COMMANDS:
        raise ValueError(f"{name}: not a Slurm command tokenlife wraps")
    action = _DROP if name in SLURMD_COMMANDS else _REFRESH
    find = _FIND_IN_BIN if slurm_bin_dir else _FIND_IN_PATH
    values = {
        "name": name,
        "depth": DEPTH_VAR,
        "wrapper_dir": wrapper_dir,
        "bin": slurm_bin_dir,
        "awk": _NEWER_AWK.strip("\n"),
    }
    return "".join(part.format(**values) for part in (_HEAD, action, find, _EXEC))


def install(wrapper_dir: str, slurm_bin_dir: str = "") -> list[str]:
    """Write every wrapper into ``wrapper_dir`` (0755, each replaced atomically).

    Returns the names written.  Files of an earlier install that are no
    longer wrapped are removed; other files in the directory are left alone.
    """
    from pathlib import Path

    from tokenlife import fsutil

    directory = Path(wrapper_dir)
    fsutil.ensure_dir(directory)
    marker = directory / MARKER
    try:
        before = set(marker.read_text().split()[len(FORMAT.split()) :])
    except FileNotFoundError:
        before = set()
    for name in COMMANDS:
        text = script(name, wrapper_dir, slurm_bin_dir)
        fsutil.write_secret(directory / name, text.encode(), mode=0o755)
    for name in sorted(before - set(COMMANDS)):
        if name.isalnum():  # only plain names, as an earlier install wrote them
            fsutil.remove_file(directory / name)
    listing = f"{FORMAT}\n" + "\n".join(COMMANDS) + "\n"
    fsutil.write_secret(marker, listing.encode(), mode=0o644)
    return list(COMMANDS)


def problem(wrapper_dir: str, uid: int) -> str | None:
    """Why the wrappers in ``wrapper_dir`` must not be used for ``uid``, or None.

    They are complete (the marker is there), and nobody but root (or ``uid``
    itself, who can only fool themselves) can change the directory or any
    directory above it; a sticky directory such as /tmp is fine above it.
    """
    try:
        os.stat(os.path.join(wrapper_dir, MARKER))
    except OSError:
        return f"{wrapper_dir}: no Slurm wrappers there (run tokenlife-engine install-wrappers)"
    path = os.path.realpath(wrapper_dir)
    first = True
    while True:
        try:
            st = os.stat(path)
        except OSError as exc:
            return f"{path}: {exc.strerror}"
        if st.st_uid not in (0, uid):
            return f"{path}: owned by uid {st.st_uid}, not root: wrappers refused"
        sticky = not first and st.st_mode & stat.S_ISVTX
        if st.st_mode & 0o022 and not sticky:
            return f"{path}: writable by others: wrappers refused"
        if path == "/":
            return None
        path, first = os.path.dirname(path), False


def task_path(wrapper_dir: str, path: str | None) -> str:
    """``path`` with ``wrapper_dir`` first, and only once."""
    rest = [d for d in (path or FALLBACK_PATH).split(":") if d.rstrip("/") != wrapper_dir]
    return ":".join([wrapper_dir, *rest])
