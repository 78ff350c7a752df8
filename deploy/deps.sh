#!/bin/sh
# Install what building and testing modelmux needs on Debian 12, only what is
# missing. Called by `make deps` (and so by `make run` / `make test`).
set -e
PKGS="gcc make pkg-config libevent-dev libcurl4-openssl-dev libjansson-dev libhiredis-dev \
redis-server nginx-light wrk clang libclang-rt-14-dev curl procps \
libpcre2-dev libopenblas-dev unicode-data chromium"
missing=""
# Node.js may come from elsewhere than Debian (the machine image ships its
# own); only ask apt for it when the commands are missing.
command -v node >/dev/null 2>&1 || missing="$missing nodejs"
command -v npm >/dev/null 2>&1 || missing="$missing npm"
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
# npm ci when any dependency pinned in tests/package.json is not installed.
if [ -f tests/package.json ] && ! node -e '
    const deps = Object.keys(require("./tests/package.json").dependencies || {});
    const fs = require("fs");
    process.exit(deps.every((d) => fs.existsSync("tests/node_modules/" + d + "/package.json")) ? 0 : 1);
' 2>/dev/null; then
    echo "deps: npm ci in tests/"
    (cd tests && npm ci --no-audit --no-fund --loglevel=error)
fi
