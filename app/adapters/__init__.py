"""Adapters: everything that talks to the outside (job stores, git, the CLI process)."""
