"""The README's configuration table and `.env.example`, generated from the Settings fields
(so a setting is declared once). `python -m chatserver.settings_docs --write` rewrites
both; a unit test fails when either is out of date.
"""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
from pathlib import Path
from typing import Any

from .config import declared

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- settings: begin (generated) -->", "<!-- settings: end -->"

ENV_HEADER = """\
# chatserver configuration. Copy to .env; every line below is optional and shows the
# default (or, where the default is empty, an example). The CLI flags (--port,
# --redis-url, ...) win over these. Generated from chatserver/config.py:
#   python -m chatserver.settings_docs --write
# docker compose reads .env too (docker-compose.yml sets PORT, REDIS_URL and
# CHAT_TRUSTED_PROXIES itself, and defaults the CHAT_DEV_AUTH, CHAT_COOKIE_SECURE and
# CHAT_ALLOWED_ORIGINS below to local-http values).
"""


def _default_text(spec: dataclasses.Field[Any]) -> str:
    """The default as a variable's value: 1/0 for flags, 10 for 10.0, "" for none."""
    value = spec.default
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if value is None or value == ():
        return ""
    return str(value)


def markdown_table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for spec in declared():
        meta = spec.metadata
        shown = meta["shown"]
        if shown is None:
            shown = f"`{_default_text(spec)}`" if _default_text(spec) else ""
        rows.append(f"| `{meta['env']}` | {shown} | {meta['doc']} |")
    return "\n".join(rows)


def env_example() -> str:
    lines = [ENV_HEADER.rstrip("\n")]
    group = None
    for spec in declared():
        meta = spec.metadata
        if meta["group"] != group:
            group = meta["group"]
            lines += ["", f"# --- {group} ".ljust(86, "-")]
        doc = meta["doc"].replace("`", "")
        doc = doc[0].upper() + doc[1:] + "."
        lines += textwrap.wrap(doc, 86, initial_indent="# ", subsequent_indent="# ")
        shown = (meta["shown"] or "").replace("`", "")
        if shown and shown not in ("unset", "none"):
            lines.append(f"# Default: {shown}.")
        literal = _default_text(spec) if meta["shown"] is None else ""
        lines.append(f"# {meta['env']}={meta['example'] or literal}")
    return "\n".join(lines) + "\n"


def readme_with_table(readme: str) -> str:
    """The README text with the generated table between the markers."""
    head, begin, rest = readme.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError(f"README.md has no {BEGIN} ... {END} block")
    return f"{head}{BEGIN}\n{markdown_table()}\n{END}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="rewrite README.md and .env.example")
    args = parser.parse_args()
    if not args.write:
        print(markdown_table())
        return
    readme = ROOT / "README.md"
    readme.write_text(readme_with_table(readme.read_text()))
    (ROOT / ".env.example").write_text(env_example())


if __name__ == "__main__":
    main()
