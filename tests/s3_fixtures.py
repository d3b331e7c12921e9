"""Fixtures for a real S3 protocol endpoint on loopback (moto's server mode)."""
