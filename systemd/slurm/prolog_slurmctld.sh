#!/bin/sh
# tokenlife: Slurm PrologSlurmctld (slurm.conf: PrologSlurmctld=/etc/slurm/tokenlife-prolog-slurmctld.sh).
# slurmctld runs it as SlurmUser when a job is allocated, before it starts:
# it delivers the job user's token to the job's nodes now, so the first task's
# TaskProlog finds it. SlurmUser must be able to read the config, the SSH
# identity file and known_hosts, and write the store. 'push --job' waits at
# most delivery.job_timeout and exits 0; keep 'exit 0' here too (no exec): a
# failing PrologSlurmctld requeues and holds the job, and a log file the shell
# cannot open fails the command before tokenlife even runs.
/usr/local/bin/tokenlife push --job 2>>/var/log/tokenlife/prolog.log
exit 0
