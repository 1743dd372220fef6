"""Every Name an invalid manifest line could mean, read as the validator reads the line.

`sync --prune` deletes the account's groups that the manifest does not give. An invalid line
(kept with --skip-invalid) still gives its Name, and a line that is invalid may give it in
several ways: a key repeated (`{"Name":"A","Name":"B"}`: orjson keeps the last value, another
parser the first), an escape (`"Na\\u006de"` is the key Name), a Name beside bad fields, a
Name that breaks the Name rules but is still a string. Each of those is a Name the user may
have meant, so each is protected from the prune.

The line is parsed as validate.parse_line parses it: orjson first (a line it refuses is not JSON
to us, so no Name can be read: the prune is refused), then the standard library with
`object_pairs_hook`, which shows every key of the top-level object, repeats included. Only
the top-level object's "Name" keys count: a Tag holding a "Name" key names no group.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def names_of(raw: bytes) -> tuple[str, ...]:
    """Every string value of a top-level "Name" key of `raw`, in line order, each once;
    () when the line is not a JSON object the validator can read, or gives no Name string."""
    try:
        text = raw.decode("utf-8")
        if not isinstance(orjson.loads(text), dict):
            return ()
    except (UnicodeDecodeError, orjson.JSONDecodeError):
        return ()
    top: list[list[tuple[str, Any]]] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        # Called innermost object first: the last call is the top-level object.
        top[:] = [items]
        return dict(items)

    try:
        json.loads(text, object_pairs_hook=pairs)
    except (ValueError, RecursionError):  # orjson read it; this is belt and braces
        return ()
    found = (value for key, value in (top[0] if top else ()) if key == "Name")
    return tuple(dict.fromkeys(v for v in found if isinstance(v, str)))
