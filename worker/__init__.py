"""Bulk provisioning worker for Volcengine Live pull-to-push groups."""

# The release's one version: pyproject.toml reads it (setuptools dynamic version), and every
# `live-groups-worker:` image tag in deploy/ and the docs must name it (tests/test_deploy.py).
__version__ = "0.2.0"
