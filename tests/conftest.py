"""Shared fixtures: tiny model, tiny datasets, reference runs; S3 fixtures live in s3_fixtures.py."""

from __future__ import annotations

pytest_plugins = ["s3_fixtures"]
