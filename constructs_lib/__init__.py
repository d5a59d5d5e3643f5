"""Reusable L3 constructs. They take keyword-only settings and read no environment variables."""
