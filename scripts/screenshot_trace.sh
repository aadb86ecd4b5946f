#!/usr/bin/env bash
# Open a trace page in headless Chromium (Debian package `chromium`) and save a screenshot.
#
#   scripts/screenshot_trace.sh PAGE.html [OUT.png] [WIDTH] [HEIGHT] [HOVER_TOKEN]
#
# OUT defaults to PAGE-screenshot.png; HOVER_TOKEN (a token position) opens the page with that
# token hovered, so the tooltip and its edges are in the picture. Every host name resolves to
# nothing, so the screenshot also shows the page needs no network.
set -euo pipefail
page=$(realpath "$1")
out=$(realpath -m "${2:-${1%.html}-screenshot.png}")
width=${3:-1400}
height=${4:-900}
hover=${5:-}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
  echo "no chromium on PATH (Debian: apt-get install chromium)" >&2
  exit 2
fi
url="file://$page"
if [ -n "$hover" ]; then url="$url#hover=$hover"; fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
# --no-sandbox: Chromium refuses to run as root with its sandbox (containers, CI).
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$profile" \
  --host-resolver-rules="MAP * ~NOTFOUND" --virtual-time-budget=3000 \
  --window-size="$width,$height" --screenshot="$out" "$url" >/dev/null 2>&1
test -s "$out"
echo "$out"
