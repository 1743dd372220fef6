"""Bulk provisioning worker for Volcengine Live pull-to-push groups."""

__version__ = "0.2.0"
