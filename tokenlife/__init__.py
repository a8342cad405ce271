"""tokenlife: Kerberos-style lifecycle for Slurm JWTs (the small shared core)."""

__version__ = "0.1.0"
