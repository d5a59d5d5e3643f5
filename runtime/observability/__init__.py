"""Metrics (EMF, Prometheus), the audit line and log redaction. Imports only the shared ground."""
