#!/usr/bin/env bash
# Set up the environment and run everything CI runs, each lane in turn, and fail if any failed:
#   lint       ruff + basedpyright (scripts/lint.sh)
#   default    pytest -m "not real_model": every test but the real-model ones (SQLite)
#   postgres   pytest -m postgres against a throwaway PostgreSQL (scripts/postgres.sh; installs it from
#              Debian packages when missing, which needs root or sudo)
#   real-model bash scripts/setup_real_model.sh, then pytest -m real_model (where that script exists)
# With arguments, only the default lane runs, with them passed to pytest (e.g. -m "not slow").
# STILLROOM_SKIP_LANES="postgres real-model" leaves lanes out (reported, never silently).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
. .venv/bin/activate
# Debian's chromium and chromedriver for the web console's browser test (tests/test_console.py),
# installed when missing (root or sudo); without them that test skips saying why, but not in the
# lanes below (CI), where STILLROOM_REQUIRE_BROWSER=1 makes a missing browser a failure.
bash scripts/chromium.sh || echo "test.sh: no chromium: the console's browser test cannot run"

if [ $# -gt 0 ]; then
    exec python -m pytest -q "$@"
fi
export STILLROOM_REQUIRE_BROWSER=1

failed=()
skipped=()
# lane NAME NO_TESTS_OK COMMAND...: runs it, records a failure; pytest's exit 5 ("no tests collected")
# counts as a pass only where NO_TESTS_OK is yes.
lane() {
    local name=$1 no_tests_ok=$2; shift 2
    if [[ " ${STILLROOM_SKIP_LANES:-} " == *" $name "* ]]; then
        skipped+=("$name"); echo "== lane $name: skipped (STILLROOM_SKIP_LANES)"; return
    fi
    echo "== lane $name: $*"
    local start=$SECONDS rc=0
    "$@" || rc=$?
    if [ $rc -eq 5 ] && [ "$no_tests_ok" = yes ]; then rc=0; fi
    echo "== lane $name: $([ $rc -eq 0 ] && echo passed || echo "FAILED (exit $rc)") in $((SECONDS - start)) s"
    [ $rc -eq 0 ] || failed+=("$name")
}

postgres_lane() {
    local url
    url=$(bash scripts/postgres.sh start) || return 1
    STILLROOM_TEST_DATABASE_URL=$url python -m pytest -q -m postgres
    local rc=$?
    bash scripts/postgres.sh stop
    return $rc
}

real_model_lane() {
    bash scripts/setup_real_model.sh && python -m pytest -q -m real_model
}

lane lint no bash scripts/lint.sh
lane default no python -m pytest -q -m "not real_model"
lane postgres no postgres_lane
if [ -f scripts/setup_real_model.sh ]; then
    lane real-model yes real_model_lane
fi

[ ${#skipped[@]} -eq 0 ] || echo "lanes skipped: ${skipped[*]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "lanes FAILED: ${failed[*]}"
    exit 1
fi
echo "all lanes passed"
