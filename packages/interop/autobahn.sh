#!/usr/bin/env bash
# Autobahn|Testsuite, the field's WebSocket conformance suite (fuzzingclient: framing,
# fragmentation, control frames, UTF-8, close handling, permessage-deflate; cases 1-7, 10, 12,
# 13), against examples/echo without and with permessage-deflate, judged by
# autobahn_judge.py. The suite's Python 3 port comes from ../shared/autobahn (setup.sh builds
# it from PyPI into $AUTOBAHN_ROOT once).
set -euo pipefail
cd "$(dirname "$0")"
autobahn=${AUTOBAHN_DIR:-../../../shared/autobahn}
[ -f "$autobahn/run.sh" ] || { echo "no Autobahn harness at $autobahn" >&2; exit 1; }
export AUTOBAHN_ROOT=${AUTOBAHN_ROOT:-/tmp/topgun-autobahn}
if [ ! -x "$AUTOBAHN_ROOT/venv/bin/wstest" ]; then
  echo "== Autobahn|Testsuite: setting up under $AUTOBAHN_ROOT"
  bash "$autobahn/setup.sh" >"$AUTOBAHN_ROOT.setup.log" 2>&1 || { cat "$AUTOBAHN_ROOT.setup.log" >&2; exit 1; }
fi
cargo build -q -p topgun-server --example echo
out=$(mktemp -d)
AUTOBAHN_OUT="$out" timeout 1800 bash "$autobahn/run.sh" ../../target/debug/examples/echo
python3 autobahn_judge.py "$out"
