#!/usr/bin/env bash
# Debian's headless browser for the web console's test (tests/test_console.py): chromium and
# chromium-driver (the WebDriver that Selenium drives), installed from Debian packages when missing,
# which needs root or sudo. Nothing downloads a browser at test time (no Selenium Manager, no
# `playwright install`): the test uses /usr/bin/chromium and /usr/bin/chromedriver.
#   bash scripts/chromium.sh    exit 0 once both are there, 1 if they cannot be installed
set -euo pipefail
log() { echo "chromium.sh: $*" >&2; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] && exit 0
log "installing chromium and chromium-driver from Debian packages (apt-get install chromium chromium-driver)"
as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 &&
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >&2 || {
    log "cannot install chromium here (needs apt-get and root or sudo)"; exit 1; }
log "$(/usr/bin/chromium --version 2>/dev/null), $(/usr/bin/chromedriver --version | cut -d' ' -f1-2)"
