#!/usr/bin/env bash
# Fetch the offline data sets vitrina uses into place. Idempotent: a second run only checks.
#
#   Fashion-MNIST, Open Clip Art : Debian packages (dataset-fashion-mnist, openclipart-png, openclipart-svg)
#   Emoji images + metadata      : npm packages emoji-datasource-{apple,google,twitter,facebook} and
#                                  emojibase-data (keywords), unpacked into $DATA/emoji/
#
# $DATA is $VITRINA_DATA when set, else <repository root>/data (the same rule as vitrina.data.paths).
set -euo pipefail

EMOJI_VERSION="16.0.0"      # emoji-datasource-*: all four styles pinned to one release
EMOJIBASE_VERSION="17.0.0"  # emojibase-data (English keywords/tags)
STYLES=(apple google twitter facebook)
APT_PACKAGES=(dataset-fashion-mnist openclipart-png openclipart-svg)

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="${VITRINA_DATA:-$REPO_ROOT/data}"
EMOJI_DIR="$DATA/emoji"

say() { printf '[setup-data] %s\n' "$*"; }

# ---- Debian packages -------------------------------------------------------------------------
source "$(dirname "${BASH_SOURCE[0]}")/_apt.sh"
extra=()
# npm fetches the emoji tarballs; a fresh Debian has none.
if ! command -v npm >/dev/null 2>&1; then extra+=(npm); fi
apt_install_missing setup-data -- "${APT_PACKAGES[@]}" "${extra[@]}"

# ---- emoji (npm pack: download the tarball without installing anything) ----------------------
mkdir -p "$EMOJI_DIR"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# npm_pack PACKAGE@VERSION -> prints the path of the downloaded .tgz (npm's chatter goes to a log)
npm_pack() {
  local name
  if ! name="$(cd "$TMP" && npm pack --loglevel=error "$1" 2>"$TMP/npm.log" | tail -n 1)" || [[ ! -f "$TMP/$name" ]]; then
    echo "[setup-data] npm pack $1 failed (is the npm registry reachable?):" >&2
    grep -v "Unknown user config" "$TMP/npm.log" >&2 || true
    exit 1
  fi
  printf '%s\n' "$TMP/$name"
}

for style in "${STYLES[@]}"; do
  stamp="$EMOJI_DIR/.emoji-datasource-$style-$EMOJI_VERSION"
  if [[ -f "$stamp" && -f "$EMOJI_DIR/emoji.json" ]]; then
    say "emoji $style $EMOJI_VERSION present ($(find "$EMOJI_DIR/img/$style/64" -name '*.png' | wc -l) images)"
    continue
  fi
  say "fetching emoji-datasource-$style@$EMOJI_VERSION"
  tgz="$(npm_pack "emoji-datasource-$style@$EMOJI_VERSION")"
  rm -rf "$TMP/x" && mkdir -p "$TMP/x"
  # Only what we use: the metadata and the 64 px images (the tarball also has 16/20/32 px and sheets).
  tar -xzf "$tgz" -C "$TMP/x" package/emoji.json "package/img/$style/64"
  if [[ ! -f "$EMOJI_DIR/emoji.json" ]]; then
    mv "$TMP/x/package/emoji.json" "$EMOJI_DIR/emoji.json"
  fi
  rm -rf "$EMOJI_DIR/img/$style/64"
  mkdir -p "$EMOJI_DIR/img/$style"
  mv "$TMP/x/package/img/$style/64" "$EMOJI_DIR/img/$style/64"
  rm -f "$tgz"
  touch "$stamp"
  say "emoji $style: $(find "$EMOJI_DIR/img/$style/64" -name '*.png' | wc -l) images in $EMOJI_DIR/img/$style/64"
done

stamp="$EMOJI_DIR/.emojibase-data-$EMOJIBASE_VERSION"
if [[ -f "$stamp" && -f "$EMOJI_DIR/emojibase/data.json" ]]; then
  say "emojibase-data $EMOJIBASE_VERSION present"
else
  say "fetching emojibase-data@$EMOJIBASE_VERSION (English keywords)"
  tgz="$(npm_pack "emojibase-data@$EMOJIBASE_VERSION")"
  rm -rf "$TMP/x" && mkdir -p "$TMP/x"
  tar -xzf "$tgz" -C "$TMP/x" package/en/data.json
  mkdir -p "$EMOJI_DIR/emojibase"
  mv "$TMP/x/package/en/data.json" "$EMOJI_DIR/emojibase/data.json"
  rm -f "$tgz"
  touch "$stamp"
  say "emojibase keywords in $EMOJI_DIR/emojibase/data.json"
fi

say "data ready in $DATA"
