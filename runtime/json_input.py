"""JSON from outside (a secret's value, the auth service's answer, a cache entry, a setting).

`json.loads` fails in three ways, and only two are `ValueError`: malformed text
(`JSONDecodeError`), an integer of more than 4,300 digits (`ValueError`), and nesting deeper
than the interpreter's recursion limit (`RecursionError`: a 64 KiB secret value of `[[[[...`
is enough). Every caller of ours handles ValueError, so `loads` turns all three into one with a
message that says what was wrong, and nothing else escapes.
"""

from __future__ import annotations

import json
from typing import Any


def loads(text: str | bytes) -> Any:
    """`json.loads(text)`, raising only `ValueError` (with the reason) for anything it refuses."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except UnicodeDecodeError:
        raise ValueError("not valid JSON (not UTF-8 text)") from None
    except RecursionError:
        raise ValueError("not valid JSON here (nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer longer than the interpreter converts
        raise ValueError(f"not valid JSON here ({exc})") from None
