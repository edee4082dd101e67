#!/usr/bin/env bash
# Runs every fuzz target over its committed seeds (dataplane/fuzz/seeds/T) plus a working corpus
# (target/fuzz-corpus/T), for SECS seconds each or until RUNS executions, whichever comes first,
# and prints a table of executions per target. A crash fails the run and leaves its input in
# dataplane/fuzz/artifacts/T/. Usage: run.sh SECS [RUNS] [TABLE.md]
# SANITIZER (default address) is cargo fuzz's -s: the campaign runs with none (see
# docs/security.md), into its own target directory so the two builds do not replace each other.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:?seconds per target}; runs=${2:-0}; table=${3:-}
san=${SANITIZER:-address}
build=(-O -s "$san")
[ "$san" != address ] && build+=(--target-dir "../target/fuzz-$san")
targets=$(sed -n 's/^name = "\(.*\)"/\1/p' fuzz/Cargo.toml | grep -v '^dataplane-fuzz$')
export RUSTC_BOOTSTRAP=1
t0=$(date +%s)
cargo fuzz build "${build[@]}" >/dev/null 2>&1 || cargo fuzz build "${build[@]}"
echo "fuzz targets built in $(( $(date +%s) - t0 )) s"
rows=""
for t in $targets; do
  mkdir -p ../target/fuzz-corpus/$t fuzz/seeds/$t
  log=../target/fuzz-corpus/$t.log
  ts=$(date +%s)
  args=(-max_total_time="$secs" -print_final_stats=1 -rss_limit_mb=2048 -timeout=20)
  [ "$runs" != 0 ] && args+=(-runs="$runs")
  if ! cargo fuzz run "${build[@]}" "$t" ../target/fuzz-corpus/$t fuzz/seeds/$t -- "${args[@]}" >"$log" 2>&1; then
    tail -n 40 "$log"; echo "fuzz target $t FAILED (input in dataplane/fuzz/artifacts/$t/)"; exit 1
  fi
  n=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  el=$(( $(date +%s) - ts ))
  printf '%-14s %12s runs in %5s s  (%s/s)  cov %s\n' "$t" "$n" "$el" "$(( n / (el > 0 ? el : 1) ))" "${cov:-?}"
  rows+="| \`$t\` | $n | $el | $(( n / (el > 0 ? el : 1) )) | ${cov:-?} |"$'\n'
done
echo "fuzzing took $(( $(date +%s) - t0 )) s"
if [ -n "$table" ]; then
  { echo "Sanitizer: $san. Commit $(git rev-parse --short HEAD), $(date -u +%Y-%m-%d), $(nproc) cores, kernel $(uname -r)."; echo
    echo "| target | executions | seconds | per second | coverage (edges) |"; echo "|---|---:|---:|---:|---:|"; printf '%s' "$rows"; } > "$table"
fi
