"""Construct ids made from declared names, so a declared service gets ids like ours (`Api`, `Worker`)."""

from __future__ import annotations


def construct_label(name: str) -> str:
    """`document-converter` -> `DocumentConverter`; a one-word name is capitalized (`api` -> `Api`), as the
    ids of our own three services have always been, so their logical IDs do not change."""
    return "".join(part.capitalize() for part in name.split("-"))
