"""producer: mint Slurm-compatible JWTs at login (PAM) and on request."""
