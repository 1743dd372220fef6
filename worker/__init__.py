"""Bulk provisioning worker for Volcengine Live pull-to-push groups."""

__version__ = "0.1.0"
