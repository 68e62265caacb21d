"""Shared helpers of the command-line entry points."""
from __future__ import annotations

import functools
import json
import os
import sys
from typing import Callable, Iterable


def exit_on_user_error(main: Callable) -> Callable:
    """Turn the errors that describe bad input (ValueError, FileNotFoundError) into one clear line
    on stderr and exit status 2, instead of a traceback. ``NNHARMONY_DEBUG=1`` shows the traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (ValueError, FileNotFoundError) as e:
            if os.environ.get("NNHARMONY_DEBUG"):
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def parse_key_value_pairs(items: Iterable[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{flag}: expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def parse_trainer_options(text: str | None) -> dict:
    """``--trainer-options`` JSON object of trainer attributes (empty when not given)."""
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--trainer-options is not valid JSON: {e}") from None
    if not isinstance(options, dict):
        raise ValueError(f"--trainer-options must be a JSON object of trainer attributes, got {text!r}")
    return options
