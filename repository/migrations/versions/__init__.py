"""Alembic revisions of the token store."""
