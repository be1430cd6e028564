"""Render deploy/nginx.conf for a topology other than docker compose's.

The file is valid as it stands for compose. This rewrites only what differs
elsewhere: the upstream's `server` lines, the `listen` line and, with a runtime
directory, the paths nginx writes to (and the `user` line, for a non-root or
non-Docker host). Used by tests/e2e; also runnable:

    python deploy/render_nginx.py --listen 127.0.0.1:8080 \
        --server 127.0.0.1:9001 --server 127.0.0.1:9002 [--runtime-dir DIR] > nginx.conf
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

TEMPLATE = Path(__file__).with_name("nginx.conf")
UPSTREAM = "chatserver"
COMPOSE_RUNTIME_DIR = "/var/cache/nginx"

_UPSTREAM_BLOCK = re.compile(r"(upstream\s+" + UPSTREAM + r"\s*\{)(.*?)(\n\s*\})", re.S)
_SERVER_LINE = re.compile(r"^([ \t]*)server[ \t]+([^;\s]+)((?:[ \t]+[^;\s]+)*)[ \t]*;[^\n]*", re.M)
_LISTEN_LINE = re.compile(r"^([ \t]*)listen[ \t]+[^;]+;", re.M)
_USER_LINE = re.compile(r"^[ \t]*user[ \t]+[^;]+;[^\n]*\n", re.M)


class TemplateError(ValueError):
    """deploy/nginx.conf no longer has the one upstream/listen the renderer rewrites."""


def upstream_servers(conf: str) -> list[str]:
    """The `host:port` of each server line in the chatserver upstream block."""
    return [m.group(2) for m in _SERVER_LINE.finditer(_upstream_body(conf))]


def listen_addresses(conf: str) -> list[str]:
    """The argument of each `listen` directive (e.g. `3020`)."""
    return [m.group(0).split(None, 1)[1].rstrip(";").strip() for m in _LISTEN_LINE.finditer(conf)]


def render(
    conf: str,
    *,
    listen: str,
    servers: Sequence[str],
    runtime_dir: str | Path | None = None,
) -> str:
    """Return `conf` with the upstream pointing at `servers` and listening on `listen`.

    The first template server line's parameters (max_fails=...) are kept for every
    server. With `runtime_dir`, the temp paths move under it and `user` is dropped
    (a root master then runs its workers as nobody); pass `-g 'daemon off; pid ...;'`
    and `-e` on the command line for the rest.
    """
    if not servers:
        raise ValueError("at least one upstream server is needed")
    block = _UPSTREAM_BLOCK.search(conf)
    if block is None:
        raise TemplateError(f"no `upstream {UPSTREAM} {{...}}` block")
    body = block.group(2)
    first = _SERVER_LINE.search(body)
    if first is None:
        raise TemplateError(f"upstream {UPSTREAM} has no server line")
    indent, params = first.group(1), first.group(3)
    lines = "\n".join(f"{indent}server {s}{params};" for s in servers)
    rest = re.sub(r"\n[ \t]*server[ \t][^;]*;[^\n]*", "", body[first.end() :])
    body = body[: first.start()] + lines + rest
    conf = conf[: block.start(2)] + body + conf[block.end(2) :]

    if len(_LISTEN_LINE.findall(conf)) != 1:
        raise TemplateError("expected exactly one `listen` line")
    conf = _LISTEN_LINE.sub(lambda m: f"{m.group(1)}listen {listen};", conf)

    if runtime_dir is not None:
        conf = _USER_LINE.sub("", conf)
        conf = conf.replace(COMPOSE_RUNTIME_DIR, str(Path(runtime_dir)))
    return conf


def _upstream_body(conf: str) -> str:
    block = _UPSTREAM_BLOCK.search(conf)
    if block is None:
        raise TemplateError(f"no `upstream {UPSTREAM} {{...}}` block")
    return block.group(2)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", type=Path, default=TEMPLATE)
    parser.add_argument("--listen", required=True, help="e.g. 127.0.0.1:8080")
    parser.add_argument("--server", action="append", required=True, help="host:port, repeatable")
    parser.add_argument("--runtime-dir", help="directory for nginx's temp files")
    args = parser.parse_args(argv)
    sys.stdout.write(
        render(
            args.template.read_text(),
            listen=args.listen,
            servers=args.server,
            runtime_dir=args.runtime_dir,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
