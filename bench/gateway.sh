#!/usr/bin/env bash
# Gateway throughput and latency: the full check path (token verify + Cedar decision + durable
# audit append + forward) against the demo upstream, and the same load straight to the upstream,
# in one run. Needs `wrk` and `hey` (Debian: apt-get install wrk hey).
#
#   bench/gateway.sh [duration_seconds] [connections]
#
# Prints: maximum throughput (wrk, `connections` connections) direct and through the gateway,
# then latency at a fixed 1,000 requests/s (hey: 10 workers x 100 req/s) direct and through the
# gateway. What the check path adds is the difference between the gateway and direct rows.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-10}
CONNS=${2:-32}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/palisade-target}"
cargo build --release -p palisade >/dev/null
BIN="$CARGO_TARGET_DIR/release/palisade"
DATA=$(mktemp -d)
PORT=18443
"$BIN" serve --demo --listen 127.0.0.1:$PORT --data-dir "$DATA" >"$DATA/out.txt" 2>"$DATA/err.txt" &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$DATA"' EXIT
for _ in $(seq 50); do grep -q "Press Ctrl-C" "$DATA/out.txt" 2>/dev/null && break; sleep 0.2; done
SECRET=$(grep -o 'client_secret=[^ ]*' "$DATA/out.txt" | cut -d= -f2)
UPSTREAM=$(awk '/upstream /{print $2; exit}' "$DATA/out.txt")
TOKEN=$(curl -s -d grant_type=client_credentials -d client_id=agent:ticket-triage -d client_secret="$SECRET" \
  http://127.0.0.1:$PORT/oauth2/token | sed -E 's/.*"access_token":"([^"]+)".*/\1/')
echo "== machine: $(nproc) cores, $(awk '/MemTotal/{print int($2/1024/1024)" GiB"}' /proc/meminfo), $(uname -sr)"
echo "== direct to upstream ($UPSTREAM), ${DURATION}s, $CONNS connections"
wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency "$UPSTREAM/tickets/42" | sed -n '1,20p'
echo "== through the gateway (verify + Cedar + durable audit), ${DURATION}s, $CONNS connections"
wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$PORT/tickets/42" | sed -n '1,20p'
for target in "direct $UPSTREAM/tickets/42" "gateway http://127.0.0.1:$PORT/tickets/42"; do
  set -- $target
  echo "== $1 at a fixed 1,000 requests/s (hey -c 10 -q 100), ${DURATION}s"
  if [ "$1" = gateway ]; then AUTH=(-H "Authorization: Bearer $TOKEN"); else AUTH=(); fi
  hey -z "${DURATION}s" -c 10 -q 100 "${AUTH[@]}" "$2" | sed -n '/Summary/,/Status code/p' | grep -vE '^\s*$|\|'
done
EVENTS=$("$BIN" audit verify --data-dir "$DATA" || true)
echo "== $EVENTS"
