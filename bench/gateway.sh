#!/usr/bin/env bash
# Gateway throughput and latency: the full check path (token verify + Cedar decision + durable
# audit append + forward) against the demo upstream, and the same load straight to the upstream,
# in one run. Needs `wrk` (Debian: apt-get install wrk); the fixed-rate runs use our own
# open-loop generator, crates/loadgen.
#
#   bench/gateway.sh [duration_seconds] [connections]
#
# Prints: latency at a fixed, evenly spaced 1,000 requests/s (palisade-loadgen) direct and
# through the gateway, then maximum throughput (wrk, `connections` connections) direct and
# through the gateway. What the check path adds is the difference between the gateway and direct rows.
# Every agent request runs in a session (session lookup and counters). A second server on the
# same upstream adds what is configurable: three rate limits (agent, route, agent x route, all
# far above the load) and an object-read rule, and is measured the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-10}
CONNS=${2:-32}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/palisade-target}"
cargo build --release -p palisade -p palisade-loadgen >/dev/null
BIN="$CARGO_TARGET_DIR/release/palisade"
LOADGEN="$CARGO_TARGET_DIR/release/palisade-loadgen"
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
# The fixed-rate runs come first, on a server that has had a 3-second warm-up at the same rate
# (not counted), so they measure the steady state at 1,000/s rather than the WAL and page cache
# catching up after a maximum-rate run.
echo "== fixed 1,000 requests/s, evenly spaced (palisade-loadgen), ${DURATION}s each, after a 3 s warm-up"
"$LOADGEN" --label "warm-up" --rate 1000 --seconds 3 -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$PORT/tickets/42" >/dev/null
"$LOADGEN" --label "direct " --rate 1000 --seconds "$DURATION" "$UPSTREAM/tickets/42"
"$LOADGEN" --label "gateway" --rate 1000 --seconds "$DURATION" -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$PORT/tickets/42"
echo "== direct to upstream ($UPSTREAM), ${DURATION}s, $CONNS connections"
wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency "$UPSTREAM/tickets/42" | sed -n '1,20p'
echo "== through the gateway (verify + Cedar + durable audit), ${DURATION}s, $CONNS connections"
wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$PORT/tickets/42" | sed -n '1,20p'
EVENTS=$("$BIN" audit verify --data-dir "$DATA" || true)
echo "== $EVENTS"

PORT2=18444
mkdir -p "$DATA/limits"
cat >"$DATA/limits.toml" <<TOML
[server]
listen = "127.0.0.1:$PORT2"
data_dir = "$DATA/limits/data"
[gateway]
agent_rate_limit = "1000000/s"
[[routes]]
name = "tickets"
path_prefix = "/tickets"
upstream = "$UPSTREAM"
rate_limit = "10000000/s"
agent_rate_limit = "1000000/s"
max_objects_per_session = 100000000
[[routes.rules]]
methods = ["GET"]
path = "/tickets/*"
action = "read"
object_read = true
TOML
"$BIN" serve --demo --config "$DATA/limits.toml" >"$DATA/limits/out.txt" 2>"$DATA/limits/err.txt" &
PID2=$!
trap 'kill $PID $PID2 2>/dev/null; wait $PID $PID2 2>/dev/null; rm -rf "$DATA"' EXIT
for _ in $(seq 50); do grep -q "Press Ctrl-C" "$DATA/limits/out.txt" 2>/dev/null && break; sleep 0.2; done
SECRET2=$(grep -o 'client_secret=[^ ]*' "$DATA/limits/out.txt" | cut -d= -f2)
# The demo agent may read 50 objects per session; lift that for the load.
PALISADE_ADDR=http://127.0.0.1:$PORT2 PALISADE_TOKEN=$(cat "$DATA/limits/data/admin.token") \
  "$BIN" agent update agent:ticket-triage --set '{"max_files_per_session": 100000000}' >/dev/null
TOKEN2=$(curl -s -d grant_type=client_credentials -d client_id=agent:ticket-triage -d client_secret="$SECRET2" \
  http://127.0.0.1:$PORT2/oauth2/token | sed -E 's/.*"access_token":"([^"]+)".*/\1/')
echo "== with rate limits and object counting on: ${DURATION}s, $CONNS connections, then fixed 1,000/s"
wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency -H "Authorization: Bearer $TOKEN2" "http://127.0.0.1:$PORT2/tickets/42" | sed -n '1,20p'
"$LOADGEN" --label "limits " --rate 1000 --seconds "$DURATION" -H "Authorization: Bearer $TOKEN2" "http://127.0.0.1:$PORT2/tickets/42"
curl -s -H "Authorization: Bearer $(cat "$DATA/limits/data/admin.token")" "http://127.0.0.1:$PORT2/api/v1/sessions" \
  | grep -o '"objects_read":[0-9]*' | head -1 | sed 's/^/== session counter /'

