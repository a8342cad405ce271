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
# It also marks the job in TOKEN_DIR/.jobs (root's, 0700; TOKEN_DIR is
# [engine] token_dir): the shipped Epilog removes the user's pulled token when
# the user's last marked job on the node ends.
ENGINE=/usr/local/bin/tokenlife-engine
LOG=/var/log/tokenlife/pull-prolog.log
LIMIT=15
TOKEN_DIR=/run/tokenlife
[ -x "$ENGINE" ] || exit 0
case "$SLURM_JOB_ID" in
    "" | *[!0-9]*) JOB="?" ;;
    *) JOB=$SLURM_JOB_ID ;;
esac
# Marked before the pull: an Epilog of the user's previous job that ends
# meanwhile then keeps the token this job is about to use.
case "$SLURM_JOB_UID:$JOB" in
    *[!0-9:]* | :* | *: | *:*:*) ;;  # both must be plain numbers
    *) if [ -d "$TOKEN_DIR" ] && [ ! -L "$TOKEN_DIR" ]; then
           [ -d "$TOKEN_DIR/.jobs" ] || mkdir -m 0700 "$TOKEN_DIR/.jobs" 2>/dev/null
           : >"$TOKEN_DIR/.jobs/$SLURM_JOB_UID.$JOB" 2>/dev/null
       fi ;;
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
