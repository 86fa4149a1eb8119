#!/usr/bin/env bash
# Install the headless browser the web-page test drives: Debian `chromium` + `chromium-driver`.
# Idempotent: when both are installed it only checks and says so. Needs root (or sudo) to install.
set -euo pipefail

APT_PACKAGES=(chromium chromium-driver)

say() { printf '[setup-browser] %s\n' "$*"; }

source "$(dirname "${BASH_SOURCE[0]}")/_apt.sh"
apt_install_missing setup-browser --no-install-recommends -- "${APT_PACKAGES[@]}"

for exe in /usr/bin/chromium /usr/bin/chromedriver; do
  if [[ ! -x "$exe" ]]; then
    echo "[setup-browser] $exe missing after install; check: apt-get install chromium chromium-driver" >&2
    exit 1
  fi
done
say "ok: $(/usr/bin/chromium --version 2>/dev/null | head -n1), $(/usr/bin/chromedriver --version 2>/dev/null | head -n1)"
