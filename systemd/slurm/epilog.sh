#!/bin/sh
# tokenlife: Slurm Epilog (slurm.conf: Epilog=/etc/slurm/tokenlife-epilog.sh).
# slurmd runs it as root on each node when a job ends. It removes the per-job
# token copies that 'tokenlife-engine run' keeps (they are removed on a normal
# exit; this catches a supervisor that was killed). The user's delivered token
# stays: transfer removes it when the user has no more work on the node. On
# pull-only nodes, where the shipped Prolog marked the job (TOKEN_DIR/.jobs),
# the user's pulled token goes when the user's last marked job here ends: no
# Slurm command is asked (Slurm advises against them in an Epilog).
# TOKEN_DIR is [engine] token_dir. Never fails: a failing Epilog drains the node.
TOKEN_DIR=/run/tokenlife
case "$SLURM_JOB_UID:$SLURM_JOB_ID" in
    *[!0-9:]* | :* | *: | *:*:*) exit 0 ;;  # both must be plain numbers
esac
# job.<jobid>.<pid>, and .job.<jobid>.<pid>.*.tmp if it died mid-write.
dir="$TOKEN_DIR/$SLURM_JOB_UID"
rm -f -- "$dir/job.$SLURM_JOB_ID."* "$dir/.job.$SLURM_JOB_ID."* 2>/dev/null
mark="$TOKEN_DIR/.jobs/$SLURM_JOB_UID.$SLURM_JOB_ID"
if [ -e "$mark" ]; then
    rm -f -- "$mark"
    set -- "$TOKEN_DIR/.jobs/$SLURM_JOB_UID".*
    # None left: the glob stays as written. rm on the user's own directory
    # removes names only (a symbolic link there is removed, never followed).
    [ -e "$1" ] || rm -f -- "$dir/slurm_jwt" "$dir/.pull.lock" 2>/dev/null
fi
exit 0
