#!/usr/bin/env bash
# Install Debian's Chromium and chromedriver for the browser tests (Testing/web) when they are missing.
# Only as root with apt-get; anywhere else this says nothing and the browser tests skip with a message.
set -uo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  exit 0
fi
echo "installing chromium and chromium-driver for the browser tests (apt-get)" >&2
apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null \
  || echo "warning: could not install chromium; the browser tests will be skipped" >&2
exit 0
