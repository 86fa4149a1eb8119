#!/usr/bin/env bash
# Install the headless browser the web-page test drives: Debian `chromium` + `chromium-driver`.
# Idempotent: when both are installed it only checks and says so. Needs root (or sudo) to install.
set -euo pipefail

APT_PACKAGES=(chromium chromium-driver)

say() { printf '[setup-browser] %s\n' "$*"; }

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done

if ((${#missing[@]})); then
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "[setup-browser] need root to run: apt-get install -y ${missing[*]} (run that as root, then re-run)" >&2
      exit 1
    fi
    SUDO="sudo"
  fi
  say "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

for exe in /usr/bin/chromium /usr/bin/chromedriver; do
  if [[ ! -x "$exe" ]]; then
    echo "[setup-browser] $exe missing after install; check: apt-get install chromium chromium-driver" >&2
    exit 1
  fi
done
say "ok: $(/usr/bin/chromium --version 2>/dev/null | head -n1), $(/usr/bin/chromedriver --version 2>/dev/null | head -n1)"
