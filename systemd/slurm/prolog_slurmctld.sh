#!/bin/sh
# tokenlife: Slurm PrologSlurmctld (slurm.conf: PrologSlurmctld=/etc/slurm/tokenlife-prolog-slurmctld.sh).
# slurmctld runs it as SlurmUser when a job is allocated, before it starts:
# it delivers the job user's token to the job's nodes now, so the first task's
# TaskProlog finds it. SlurmUser must be able to read the config, the SSH
# identity file and known_hosts, and write the store. 'push --job' waits at
# most delivery.job_timeout and exits 0; keep 'exit 0' here too (no exec): a
# failing PrologSlurmctld requeues and holds the job.
TOKENLIFE=/usr/local/bin/tokenlife
LOG=/var/log/tokenlife/prolog.log
# A log the shell cannot open would fail the command before tokenlife runs:
# try it first (in a subshell: a redirection that fails on ':' ends the shell),
# and log to syslog instead, or nowhere, when it cannot be had.
if (: >>"$LOG") 2>/dev/null; then
    "$TOKENLIFE" push --job 2>>"$LOG"
elif command -v logger >/dev/null 2>&1; then
    "$TOKENLIFE" push --job 2>&1 >/dev/null | logger -t tokenlife-prolog -p daemon.warning
else
    "$TOKENLIFE" push --job 2>/dev/null
fi
exit 0
