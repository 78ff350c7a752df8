#!/bin/sh
# Install what building and testing modelmux needs on Debian 12, only what is
# missing. Called by `make deps` (and so by `make run` / `make test`).
set -e
PKGS="gcc make pkg-config libevent-dev libcurl4-openssl-dev libjansson-dev libhiredis-dev \
redis-server nginx-light wrk clang libclang-rt-14-dev nodejs npm curl procps \
libpcre2-dev libopenblas-dev unicode-data"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "deps: missing packages:$missing (run 'make deps' as root)" >&2
        exit 1
    fi
    echo "deps: installing$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
# Debian's nginx and redis packages may try to start system services; the
# tests start their own instances on other ports, so that does not matter.
if [ -f tests/package.json ] && [ ! -d tests/node_modules/openai ]; then
    echo "deps: npm ci in tests/"
    (cd tests && npm ci --no-audit --no-fund --loglevel=error)
fi
