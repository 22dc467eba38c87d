"""Reusable test helpers (git server, ...)."""
