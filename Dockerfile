# chatserver image: slim Python, the package in a venv, non-root, no build tools.
# No `# syntax=` line: BuildKit would fetch that frontend from Docker Hub on every build.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: install the package and its wheels into /opt/venv ---------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY chatserver ./chatserver
# [fast]: uvloop and hiredis (manylinux wheels, so no compiler is needed here either).
# The .pyc files pip compiles stay: the root filesystem is read-only at run time.
RUN /opt/venv/bin/pip install '.[fast]' \
 && /opt/venv/bin/pip uninstall --yes pip setuptools wheel
# The wheels' extension modules carry debug info (uvloop's is 13 MB, 1.6 MB stripped):
# strip them here, where binutils may be; the runtime stage never sees it.
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends binutils >/dev/null \
 && find /opt/venv -name '*.so' -exec strip --strip-unneeded {} + \
 && rm -rf /var/lib/apt/lists/*

# --- runtime: the venv only ----------------------------------------------------------
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 chat \
 && useradd --system --uid 10001 --gid chat --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin chat
COPY --from=build /opt/venv /opt/venv
# The browser client; the server looks for it beside the source tree by default,
# which an installed package does not have.
COPY static /app/static
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PORT=3020 \
    CHAT_STATIC_DIR=/app/static
USER chat:chat
EXPOSE 3020
# Liveness only (/readyz would mark a replica unhealthy during a Redis blip, and
# compose would hold nginx back). Python's urllib: the slim image has no curl.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '3020'), timeout=2)"]
# SIGTERM: /readyz turns 503, sockets close 1001, exit within CHAT_GRACE.
STOPSIGNAL SIGTERM
CMD ["chatserver", "--host", "0.0.0.0"]
