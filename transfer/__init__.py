"""transfer: deliver tokens to the worker nodes (see issue: transfer)."""
