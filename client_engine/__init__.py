"""client_engine: the worker side (TaskProlog env, token, exec, run)."""
