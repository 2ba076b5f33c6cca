#!/usr/bin/env bash
# Runs schemathesis (from PyPI, pinned) against a running `herald serve` and its own
# /openapi.json: no 5xx, and every answer matches the document (status code, content type,
# schema). The server runs on a free port of 127.0.0.1 with a scratch data directory, and is
# stopped by its PID however this script ends.
set -euo pipefail
cd "$(dirname "$0")/.."

ST_VERSION="4.32.5"
TARGET="${CARGO_TARGET_DIR:-target}"
VENV="$TARGET/ci-venv"
if [ ! -x "$VENV/bin/st" ] || ! "$VENV/bin/st" --version | grep -q "$ST_VERSION"; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "schemathesis==$ST_VERSION"
fi

cargo build --quiet --bin herald
DATA="$(mktemp -d)"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
ADMIN="sk_ci_admin_$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
HERALD_ADMIN_KEY="$ADMIN" HERALD_DELIVERY_ALLOW_PRIVATE_TARGETS=true \
  "$TARGET/debug/herald" serve --data-dir "$DATA" --listen "127.0.0.1:$PORT" >"$DATA/herald.log" 2>&1 &
PID=$!
cleanup() { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; rm -rf "$DATA"; }
trap cleanup EXIT

BASE="http://127.0.0.1:$PORT"
for attempt in $(seq 1 300); do
  curl -fsS "$BASE/healthz" >/dev/null 2>&1 && break
  if ! kill -0 "$PID" 2>/dev/null || [ "$attempt" = 300 ]; then
    echo "herald did not start:" >&2
    cat "$DATA/herald.log" >&2
    exit 1
  fi
  sleep 0.1
done

# An organisation's key with every non-admin scope, and some data for it to find.
ORG="0190f1f4-0000-7000-8000-00000000c1c1"
KEY="$(curl -fsS -X POST "$BASE/v1/api_keys" -H "authorization: Bearer $ADMIN" \
  -d "{\"org_id\":\"$ORG\",\"scopes\":[\"events.write\",\"endpoints.read\",\"endpoints.write\",\"deliveries.read\",\"deliveries.write\",\"tasks.webhooks.read\"]}" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')"
curl -fsS -X POST "$BASE/v1/endpoints" -H "authorization: Bearer $KEY" \
  -d '{"url":"http://127.0.0.1:9/hook","name":"ci"}' >/dev/null
curl -fsS -X POST "$BASE/v1/events" -H "authorization: Bearer $KEY" \
  -d '{"event_type":"call.ended","payload":{"call":1}}' >/dev/null

CHECKS="not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
for key in "$KEY" "$ADMIN"; do
  "$VENV/bin/st" run "$BASE/openapi.json" --checks "$CHECKS" -H "Authorization: Bearer $key" \
    --phases examples,coverage,fuzzing --max-examples 30 --workers 1 --seed 1 --warnings off
done
kill -0 "$PID"  # still up: nothing above made it exit
