"""Deploy tooling: `python -m deploy` creates or updates the Scaleway Serverless Container.

`deploy/cockpit/` holds the Grafana dashboard and Prometheus alert rules for Cockpit.
"""
