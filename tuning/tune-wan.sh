#!/usr/bin/env bash
# dwcp tune over the WAN emulator (hw-tests/wan): brings the link up with WAN's flags, starts a
# discarding receiver in dwcp-b, runs `dwcp tune --to` from dwcp-a with the remaining flags, and
# takes the link down whatever happens. Needs root. Usage:
#   tuning/tune-wan.sh "--rtt 50ms --rate 200mbit --loss 0.1%" [dwcp tune flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
wan=$1; shift
dwcp=$PWD/target/release/dwcp
key=$(mktemp -d)/key
"$dwcp" keygen --force "$key" 2>/dev/null
cleanup() { [ -n "${rx:-}" ] && kill "$rx" 2>/dev/null; hw-tests/wan down; }
trap cleanup EXIT
# shellcheck disable=SC2086
addrs=$(hw-tests/wan up $wan)
b=${addrs#* }
ip netns exec dwcp-b "$dwcp" recv --listen "$b:7470" --discard --key-file "$key" >/dev/null 2>&1 &
rx=$!
sleep 0.5
echo "dwcp tune over the WAN emulator ($wan): receiver $b:7470 in dwcp-b" >&2
ip netns exec dwcp-a "$dwcp" tune --to "$b:7470" --key-file "$key" "$@"
