"""fondation-worker: runs the Fondation CLI for signed webhook jobs, reporting to Convex."""

__version__ = "0.1.0"
