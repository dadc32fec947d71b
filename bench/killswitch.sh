#!/usr/bin/env bash
# Kill-switch propagation under load: runs the integration test that keeps six concurrent
# clients on three sessions of one agent, calls `POST /api/v1/agents/{id}/kill` mid-load, and
# checks that no request sent after the call returned got through. Prints, per run, how long the
# call took and when the first refused request was sent, counted from the call's start.
#
#   bench/killswitch.sh [runs]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/palisade-target}"
for _ in $(seq "$RUNS"); do
  cargo test -q --release -p palisade --test sessions the_kill_switch_stops_every_session_at_once_under_load \
    -- --nocapture 2>&1 | grep '^kill switch:'
done
