#!/usr/bin/env bash
# Installs what building and testing moeforge needs, from Debian's packages. Idempotent and quiet
# when everything is present; run as root (or with sudo available).
set -euo pipefail

need=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
for cmd_pkg in cmake:cmake g++:g++ make:make clang++:clang; do
  command -v "${cmd_pkg%%:*}" >/dev/null 2>&1 || need+=("${cmd_pkg##*:}")
done
for pkg in nlohmann-json3-dev libopenblas-dev libgtest-dev libyaml-cpp-dev libpcre2-dev libutf8proc-dev pkg-config libclang-rt-14-dev libgloo-dev libcli11-dev zlib1g-dev libzstd-dev libbrotli-dev python3-venv python3-dev; do
  have_pkg "$pkg" || need+=("$pkg")
done
[ ${#need[@]} -eq 0 ] && exit 0

echo "install-deps: installing ${need[*]}" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install-deps: need root to install: ${need[*]}" >&2; exit 1; }
  SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
