"""Alembic migrations of the token store, run programmatically (no alembic.ini)."""
