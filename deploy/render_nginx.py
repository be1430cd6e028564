"""Render deploy/nginx.conf (and deploy/tls.conf) for a topology other than compose's.

The files are valid as they stand for compose. This rewrites only what differs
elsewhere: the `listen` line, the `resolver` (the DNS server that names the
replicas), the `set $chatserver` target, the `set_real_ip_from` lines (the proxy in
front whose X-Forwarded-For is believed) and, with a runtime directory, the paths
nginx writes to, the TLS include (and the `user` line, for a non-Docker host).
Used by tests/e2e; also runnable:

    python deploy/render_nginx.py --listen 127.0.0.1:8080 --resolver 127.0.0.1:5353 \
        --upstream chatserver:9001 [--real-ip-from 10.0.0.1] [--runtime-dir DIR] > nginx.conf
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

TEMPLATE = Path(__file__).with_name("nginx.conf")
TLS_TEMPLATE = Path(__file__).with_name("tls.conf")
UPSTREAM_VARIABLE = "$chatserver"
COMPOSE_RUNTIME_DIR = "/var/cache/nginx"
COMPOSE_TLS_INCLUDE = "/etc/nginx/tls.d/*.conf"
COMPOSE_CERT_DIR = "/etc/nginx/certs"

_USER_LINE = re.compile(r"^[ \t]*user[ \t]+[^;]+;[^\n]*\n", re.M)


class TemplateError(ValueError):
    """A template no longer has the one directive the renderer rewrites."""


def _line(name: str) -> re.Pattern[str]:
    """A whole `name args;` directive line (comments after it dropped), args in group 2."""
    return re.compile(rf"^([ \t]*){re.escape(name)}[ \t]+([^;\n]*);[^\n]*", re.M)


_SET_UPSTREAM = re.compile(r"^([ \t]*)set[ \t]+\$chatserver[ \t]+([^;\s]+)[ \t]*;[^\n]*", re.M)


def directive_args(conf: str, name: str) -> list[str]:
    """The arguments of each `name ...;` line (comments stripped), as one string each."""
    code = "\n".join(line.split("#", 1)[0] for line in conf.splitlines())
    return [m.group(2).strip() for m in _line(name).finditer(code)]


def listen_addresses(conf: str) -> list[str]:
    """The argument of each `listen` directive (e.g. `3020`)."""
    return directive_args(conf, "listen")


def upstream_target(conf: str) -> str:
    """The `host:port` that `set $chatserver` names (proxy_pass resolves it)."""
    found = _SET_UPSTREAM.findall(conf)
    if len(found) != 1:
        raise TemplateError("expected exactly one `set $chatserver host:port;`")
    return str(found[0][1])


def _replace_one(conf: str, name: str, value: str) -> str:
    pattern = _line(name)
    if len(pattern.findall(conf)) != 1:
        raise TemplateError(f"expected exactly one `{name}` line")
    return pattern.sub(lambda m: f"{m.group(1)}{name} {value};", conf)


def render(
    conf: str,
    *,
    listen: str,
    resolver: str,
    upstream: str,
    real_ip_from: Sequence[str] = (),
    runtime_dir: str | Path | None = None,
) -> str:
    """Return nginx.conf listening on `listen`, proxying to `upstream` as `resolver` names it.

    `resolver` keeps the template's parameters (valid=, ipv6=). `real_ip_from` replaces
    the template's set_real_ip_from lines (empty: believe no one's X-Forwarded-For).
    With `runtime_dir`, the temp paths move under it, the TLS snippets are included from
    `runtime_dir/tls.d/`, and `user` is dropped (a root master then runs its workers as
    nobody); pass `-g 'daemon off; pid ...;'` and `-e` on the command line for the rest.
    """
    conf = _replace_one(conf, "listen", listen)
    (resolver_args,) = directive_args(conf, "resolver") or [""]
    params = " ".join(resolver_args.split()[1:])
    conf = _replace_one(conf, "resolver", f"{resolver} {params}".strip())
    if len(_SET_UPSTREAM.findall(conf)) != 1:
        raise TemplateError("expected exactly one `set $chatserver host:port;`")
    conf = _SET_UPSTREAM.sub(lambda m: f"{m.group(1)}set {UPSTREAM_VARIABLE} {upstream};", conf)

    matches = list(_line("set_real_ip_from").finditer(conf))
    if not matches:
        raise TemplateError("no `set_real_ip_from` line")
    indent = matches[0].group(1)
    lines = "\n".join(f"{indent}set_real_ip_from {a};" for a in real_ip_from)
    for m in reversed(matches[1:]):  # later ones first: the earlier offsets stay valid
        conf = conf[: m.start() - 1] + conf[m.end() :]
    first, lines = matches[0], lines or f"{indent}# set_real_ip_from: none"
    conf = conf[: first.start()] + lines + conf[first.end() :]

    if runtime_dir is not None:
        runtime = Path(runtime_dir)
        conf = _USER_LINE.sub("", conf)
        conf = conf.replace(COMPOSE_RUNTIME_DIR, str(runtime))
        if COMPOSE_TLS_INCLUDE not in conf:
            raise TemplateError(f"no `include {COMPOSE_TLS_INCLUDE};`")
        conf = conf.replace(COMPOSE_TLS_INCLUDE, str(runtime / "tls.d" / "*.conf"))
    return conf


def render_tls(conf: str, *, listen: str, cert_dir: str | Path) -> str:
    """Return tls.conf listening on `listen` (ssl) with the certificate in `cert_dir`."""
    conf = _replace_one(conf, "listen", f"{listen} ssl")
    return conf.replace(COMPOSE_CERT_DIR, str(Path(cert_dir)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", type=Path, default=TEMPLATE)
    parser.add_argument("--listen", required=True, help="e.g. 127.0.0.1:8080")
    parser.add_argument("--resolver", required=True, help="DNS server, e.g. 127.0.0.1:5353")
    parser.add_argument("--upstream", required=True, help="name:port the resolver answers")
    parser.add_argument("--real-ip-from", action="append", default=[],
                        help="address/CIDR of a proxy in front, repeatable")
    parser.add_argument("--runtime-dir", help="directory for nginx's temp files and tls.d/")
    args = parser.parse_args(argv)
    sys.stdout.write(
        render(
            args.template.read_text(),
            listen=args.listen,
            resolver=args.resolver,
            upstream=args.upstream,
            real_ip_from=args.real_ip_from,
            runtime_dir=args.runtime_dir,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
