#!/usr/bin/env bash
# AuthZEN decisions over HTTP: single /access/v1/evaluation calls and batches of 10 through
# /access/v1/evaluations, against the certification fixture, every call audited durably.
# Needs `wrk` (Debian: apt-get install wrk).
#
#   bench/authzen.sh [duration_seconds] [connections]
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-10}
CONNS=${2:-32}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/palisade-target}"
cargo build --release -p palisade >/dev/null
BIN="$CARGO_TARGET_DIR/release/palisade"
WORK=$(mktemp -d)
PORT=18556
cat > "$WORK/palisade.toml" <<TOML
[server]
listen = "127.0.0.1:$PORT"
data_dir = "$WORK/data"
[policy]
dir = "$PWD/crates/palisade/tests/fixtures/authzen/cert"
[authzen]
namespace = "Cert"
TOML
"$BIN" serve --config "$WORK/palisade.toml" >"$WORK/out.txt" 2>"$WORK/err.txt" &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$WORK"' EXIT
for _ in $(seq 50); do [ -f "$WORK/data/admin.token" ] && grep -q listening "$WORK/out.txt" && break; sleep 0.2; done
ADMIN=$(cat "$WORK/data/admin.token")
ONE='{"subject":{"type":"user","id":"alice"},"action":{"name":"read"},"resource":{"type":"record","id":"record-1"}}'
TEN='{"subject":{"type":"user","id":"alice"},"action":{"name":"read"},"evaluations":['
for i in $(seq 10); do TEN+="{\"resource\":{\"type\":\"record\",\"id\":\"record-$(( i % 2 + 1 ))\"}}"; [ "$i" -lt 10 ] && TEN+=","; done
TEN+=']}'
for name in one ten; do
  body=$ONE; [ $name = ten ] && body=$TEN
  printf 'wrk.method = "POST"\nwrk.body = [[%s]]\nwrk.headers["Content-Type"] = "application/json"\nwrk.headers["Authorization"] = "Bearer %s"\n' "$body" "$ADMIN" > "$WORK/$name.lua"
done
echo "== machine: $(nproc) cores, $(uname -sr)"
echo "== single evaluations, ${DURATION}s, $CONNS connections"
wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency -s "$WORK/one.lua" "http://127.0.0.1:$PORT/access/v1/evaluation" | grep -E 'Requests/sec|50%|99%|Non-2xx'
echo "== batches of 10 evaluations, ${DURATION}s, $CONNS connections (decisions/s = 10 x requests/s)"
wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency -s "$WORK/ten.lua" "http://127.0.0.1:$PORT/access/v1/evaluations" | grep -E 'Requests/sec|50%|99%|Non-2xx'
"$BIN" audit verify --data-dir "$WORK/data"
