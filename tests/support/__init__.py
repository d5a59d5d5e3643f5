"""Helpers shared by the tests: certificate checkers and small builders."""
