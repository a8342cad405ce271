"""Where a user's token lives, on login nodes and worker nodes alike:
``<dir>/<uid>/slurm_jwt``.  No imports: the TaskProlog path reads this too."""

FILE_NAME = "slurm_jwt"
