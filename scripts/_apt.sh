# Sourced by the set-up scripts: install the Debian packages that are missing, and nothing else.
#   apt_install_missing TAG [APT_OPTION...] -- PACKAGE...
# Prints what it installs (prefixed with [TAG]); needs root or sudo only when something is missing.
apt_install_missing() {
  local tag=$1; shift
  local options=()
  while [[ $# -gt 0 && $1 != "--" ]]; do options+=("$1"); shift; done
  shift
  local missing=() pkg
  for pkg in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$pkg")
    fi
  done
  if ((${#missing[@]} == 0)); then
    printf '[%s] Debian packages present: %s\n' "$tag" "$*"
    return 0
  fi
  local sudo=""
  if [[ $(id -u) -ne 0 ]]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "[$tag] need root to run: apt-get install -y ${missing[*]} (run that as root, then re-run)" >&2
      return 1
    fi
    sudo="sudo"
  fi
  printf '[%s] installing Debian packages: %s\n' "$tag" "${missing[*]}"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${options[@]}" "${missing[@]}" >/dev/null
}
