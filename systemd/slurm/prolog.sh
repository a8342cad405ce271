#!/bin/sh
# tokenlife: Slurm Prolog for pull-only nodes (slurm.conf: Prolog=/etc/slurm/tokenlife-prolog.sh).
# slurmd runs it as root on each node of a job before the job's first task:
# 'tokenlife-engine pull' creates <engine.token_dir>/<uid> for the job's user
# (SLURM_JOB_UID, SLURM_JOB_USER; 0700, the user's) and pulls the user's token
# from the token host ([engine] pull) as that user, whom munge vouches for, so
# the first task's TaskProlog finds it. Sites that push ([delivery]) do not
# need it. The pull is bounded by engine.pull_timeout, and the whole run by
# LIMIT seconds here (keep it above pull_timeout). Never fails: a failing Prolog drains the node and holds
# the job; a task without a token still runs (the TaskProlog says why).
ENGINE=/usr/local/bin/tokenlife-engine
LOG=/var/log/tokenlife/pull-prolog.log
LIMIT=15
[ -x "$ENGINE" ] || exit 0
case "$SLURM_JOB_ID" in
    "" | *[!0-9]*) JOB="?" ;;
    *) JOB=$SLURM_JOB_ID ;;
esac
# The engine bounds the pull; timeout(1) also stops a run that hangs elsewhere
# (an NSS lookup, say) after LIMIT seconds.
run() {
    if command -v timeout >/dev/null 2>&1; then
        timeout -k 2 "$LIMIT" "$ENGINE" pull
    else
        "$ENGINE" pull
    fi
    case $? in
        124 | 137) echo "tokenlife-engine pull: stopped after ${LIMIT}s" >&2 ;;
    esac
}
# Only failures and warnings are logged (stderr), each line with its job.
tagged() { run 2>&1 >/dev/null | sed "s/^/job $JOB: /"; }
# As prolog_slurmctld.sh: a log the shell cannot open would fail the command
# before it runs, so try it first (in a subshell), else syslog, else nowhere.
if (: >>"$LOG") 2>/dev/null; then
    tagged >>"$LOG"
elif command -v logger >/dev/null 2>&1; then
    tagged | logger -t tokenlife-pull -p daemon.warning
else
    run >/dev/null 2>&1
fi
exit 0
