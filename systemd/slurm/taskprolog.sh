#!/bin/sh
# tokenlife: Slurm TaskProlog (slurm.conf: TaskProlog=/etc/slurm/tokenlife-taskprolog.sh).
# slurmd runs it as the job's user before every task; its 'export', 'unset' and
# 'print' lines set the task's environment. tokenlife-engine env exports
# SLURM_JWT_FILE, SLURM_JWT (in every task by default: [engine] export_jwt) and
# PATH with the Slurm command wrappers first (written by 'tokenlife-engine
# install-wrappers': they keep srun and sstat on munge, which slurmd needs).
# It always exits 0; so does this script: a failing TaskProlog kills the task.
ENGINE=/usr/local/bin/tokenlife-engine
# Not installed here: no token, silently. Installed but failing (an interpreter
# the job user cannot run, a broken venv): one line in the task's output, so
# the job is not left to find out from a failing squeue.
if [ -x "$ENGINE" ]; then
    "$ENGINE" env || echo "print tokenlife: $ENGINE failed (exit status $?): no SLURM_JWT for this task"
fi
exit 0
