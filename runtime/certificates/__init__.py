"""Certificates: PEM, issuance, verification, inspection, sets on disk, TLS contexts. Imports only runtime's shared ground (names, errors, json_input, security_level)."""
