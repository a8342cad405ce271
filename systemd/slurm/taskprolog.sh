#!/bin/sh
# tokenlife: Slurm TaskProlog (slurm.conf: TaskProlog=/etc/slurm/tokenlife-taskprolog.sh).
# slurmd runs it as the job's user before every task; its 'export', 'unset' and
# 'print' lines set the task's environment. tokenlife-engine env exports
# SLURM_JWT_FILE, and SLURM_JWT where [engine] export_jwt allows (by default in
# srun-launched steps, not in the batch step, where srun and sstat need munge).
# It always exits 0; so does this script: a failing TaskProlog kills the task.
ENGINE=/usr/local/bin/tokenlife-engine
[ -x "$ENGINE" ] && "$ENGINE" env
exit 0
