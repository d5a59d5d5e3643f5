"""Authorization by identity and route (issue 15): which services may call which methods and paths.

Modelled on Istio's AuthorizationPolicy (ALLOW rules, `dry-run`) and Linkerd's per-route policy. A
server given a policy (`HOKUSAI_MTLS_ROUTE_POLICY`, JSON; the CDK writes it from the settings) lets
a caller that presented a verified certificate through only if one rule allows its identity, method
and path; everything else is denied (403). Callers on the API-key path are not affected: their keys
carry scopes of their own.

    {"mode": "enforce",                      # or "audit": count and log what would be denied, deny nothing
     "rules": [
       {"identities": ["worker"], "methods": ["GET", "POST"], "paths": ["/api/2.0/mlflow/runs/**"]},
       {"identities": ["*"], "methods": ["GET"], "paths": ["/health", "/version"]}
     ]}

- `identities`: service names as the certificate's SPIFFE ID names them (`spiffe://hokusai/<env>/<service>`),
  or `*` (any identity the server accepts at all).
- `methods`: HTTP methods, or `*`. `GET` also allows `HEAD`.
- `paths`: `/`-separated patterns: a segment `*` matches one segment, a final `**` any rest (none
  included); anything else matches itself exactly. The path is the one routing sees (percent-decoded
  by the server, as `scope["path"]`); a pattern never matches a `..` segment, and `/a/` is not `/a`.
- `routes`, instead of `methods` and `paths`: entries of a built-in route table. `mlflow:read` and
  `mlflow:write` are MLflow's (`runtime.auth.mlflow_routes`: searches over POST read, a route the table
  does not know writes), so `{"identities": ["worker"], "routes": ["mlflow:read"]}` lets the workers read
  MLflow and nothing else, without listing MLflow's hundred routes. Only an MLflow server's policy may
  use them (the settings check that).

A policy that cannot be read is refused with the field that is wrong (`ValueError`), at start-up.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from runtime import json_input, names
from runtime.auth import mlflow_routes

MODE_ENFORCE = "enforce"
MODE_AUDIT = "audit"
MODES = (MODE_ENFORCE, MODE_AUDIT)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
ANY = "*"
MAX_RULES = 200
MAX_PATTERNS = 100
ROUTE_TABLES = frozenset({mlflow_routes.READ, mlflow_routes.WRITE})
"""The built-in route table entries a rule's `routes` may name: MLflow's read and write routes."""


@dataclass(frozen=True)
class PathPattern:
    text: str
    segments: tuple[str, ...]
    rest: bool
    """Ends in `**`: the segments are a prefix."""

    @classmethod
    def parse(cls, text: str, where: str) -> PathPattern:
        if not isinstance(text, str) or not text.startswith("/") or len(text) > 512:
            raise ValueError(f"{where}: {text!r} is not a path pattern (it starts with /)")
        segments = text.split("/")[1:] if text != "/" else []
        rest = segments[-1:] == ["**"]
        if rest:
            segments = segments[:-1]
        for segment in segments:
            if segment == "**":
                raise ValueError(f"{where}: {text!r}: ** may only end a pattern")
            if segment in ("", ".", ".."):
                raise ValueError(f"{where}: {text!r} has an empty, . or .. segment")
        return cls(text, tuple(segments), rest)

    def matches(self, path_segments: Sequence[str]) -> bool:
        if self.rest:
            if len(path_segments) < len(self.segments):
                return False
        elif len(path_segments) != len(self.segments):
            return False
        return all(p in (ANY, s) for p, s in zip(self.segments, path_segments, strict=False))


@dataclass(frozen=True)
class Rule:
    identities: frozenset[str]
    methods: frozenset[str]
    paths: tuple[PathPattern, ...]
    routes: frozenset[str] = frozenset()
    """Built-in route table entries (`ROUTE_TABLES`); a rule has these or methods and paths."""

    def allows(self, identity: str, method: str, path_segments: Sequence[str], path: str = "") -> bool:
        if ANY not in self.identities and identity not in self.identities:
            return False
        if self.routes:
            return mlflow_routes.required_scope(method, path) in self.routes
        if ANY not in self.methods and method not in self.methods:
            return False
        return any(pattern.matches(path_segments) for pattern in self.paths)


@dataclass(frozen=True)
class RoutePolicy:
    mode: str
    rules: tuple[Rule, ...]

    @property
    def audit(self) -> bool:
        return self.mode == MODE_AUDIT

    def allows(self, identity: str, method: str, path: str) -> bool:
        segments = path.split("/")[1:] if path.startswith("/") else None
        if segments is None or any(s in (".", "..") for s in segments):
            return False  # routing never sees such a path from uvicorn; never allow it either
        if segments == [""]:
            segments = []  # "/" itself
        method = method.upper()
        return any(
            rule.allows(identity, method, segments, path)
            or (method == "HEAD" and rule.allows(identity, "GET", segments, path))
            for rule in self.rules
        )

    def identities(self) -> set[str]:
        """Every identity a rule names (not `*`): for checking them against the declared services."""
        return {identity for rule in self.rules for identity in rule.identities if identity != ANY}


def _strings(value: object, where: str, *, limit: int) -> list[str]:
    if not isinstance(value, list) or not value or len(value) > limit:
        raise ValueError(f"{where}: expected a list of 1 to {limit} strings")
    if not all(isinstance(item, str) and item for item in value):
        raise ValueError(f"{where}: expected non-empty strings")
    return value


def parse_policy(document: object, where: str = names.ENV_ROUTE_POLICY) -> RoutePolicy:
    """A policy from its JSON document (already decoded); `ValueError` naming the field otherwise."""
    if not isinstance(document, dict):
        raise ValueError(f"{where}: expected an object with mode and rules")
    unknown = set(document) - {"mode", "rules"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    mode = document.get("mode", MODE_ENFORCE)
    if mode not in MODES:
        raise ValueError(f"{where}.mode: expected one of {', '.join(MODES)}, got {mode!r}")
    raw_rules = document.get("rules")
    if not isinstance(raw_rules, list) or len(raw_rules) > MAX_RULES:
        raise ValueError(f"{where}.rules: expected a list of at most {MAX_RULES} rules")
    rules = []
    for index, raw in enumerate(raw_rules):
        at = f"{where}.rules[{index}]"
        if not isinstance(raw, dict) or set(raw) not in (
            {"identities", "methods", "paths"},
            {"identities", "routes"},
        ):
            raise ValueError(
                f"{at}: expected exactly identities, methods and paths, or identities and routes"
            )
        identities = _strings(raw["identities"], f"{at}.identities", limit=MAX_PATTERNS)
        if "routes" in raw:
            routes = _strings(raw["routes"], f"{at}.routes", limit=len(ROUTE_TABLES))
            unknown_routes = sorted(set(routes) - ROUTE_TABLES)
            if unknown_routes:
                raise ValueError(
                    f"{at}.routes: {unknown_routes[0]!r} is not a built-in route table entry "
                    f"({', '.join(sorted(ROUTE_TABLES))})"
                )
            rules.append(Rule(frozenset(identities), frozenset(), (), frozenset(routes)))
            continue
        methods = [m.upper() for m in _strings(raw["methods"], f"{at}.methods", limit=len(METHODS) + 1)]
        bad = [m for m in methods if m != ANY and m not in METHODS]
        if bad:
            raise ValueError(
                f"{at}.methods: {', '.join(bad)} is not an HTTP method ({', '.join(sorted(METHODS))} or *)"
            )
        paths = tuple(
            PathPattern.parse(text, f"{at}.paths")
            for text in _strings(raw["paths"], f"{at}.paths", limit=MAX_PATTERNS)
        )
        rules.append(Rule(frozenset(identities), frozenset(methods), paths))
    return RoutePolicy(mode, tuple(rules))


def policy_from_environ(
    environ: Mapping[str, str] = os.environ, *, route_tables: bool = False
) -> RoutePolicy | None:
    """`HOKUSAI_MTLS_ROUTE_POLICY`, or None (unset: every accepted identity reaches every route).

    `route_tables`: whether this server is MLflow's, whose route table rules' `routes` name; any other
    server refuses such a rule rather than judge its own app's paths by MLflow's table."""
    raw = environ.get(names.ENV_ROUTE_POLICY, "").strip()
    if not raw:
        return None
    try:
        document = json_input.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{names.ENV_ROUTE_POLICY}: not JSON ({exc})") from None
    policy = parse_policy(document)
    if not route_tables:
        check_no_route_tables(policy, names.ENV_ROUTE_POLICY)
    return policy


def check_no_route_tables(policy: RoutePolicy, where: str) -> None:
    """A ValueError naming the first rule with `routes`: for a server that is not MLflow's."""
    for index, rule in enumerate(policy.rules):
        if rule.routes:
            raise ValueError(
                f"{where}.rules[{index}].routes: only MLflow's server has a built-in route table; "
                "write methods and paths"
            )


def policy_document(rules: Iterable[Mapping[str, Sequence[str]]], mode: str = MODE_ENFORCE) -> dict:
    """The JSON document for `rules` (what the CDK writes into the variable)."""
    return {"mode": mode, "rules": [{k: list(v) for k, v in rule.items()} for rule in rules]}
