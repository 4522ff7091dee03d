#!/bin/bash
# Timing runs. Each one holds the shared bench lock and is pinned to one CPU.
# usage: ./run.sh [bench args...]      e.g. ./run.sh -r 7 -n 100000 -N 100000 -D 1000000
# env: CPU (default 1); IDLE_WAIT=seconds to wait for an idle machine first (default 0)
set -euo pipefail
cd "$(dirname "$0")"
CPU=${CPU:-1}
IDLE_WAIT=${IDLE_WAIT:-0}
mkdir -p results
busy() { # busy % per cpu over $1 seconds of /proc/stat
  local a b; a=$(grep '^cpu[0-9]' /proc/stat); sleep "$1"; b=$(grep '^cpu[0-9]' /proc/stat)
  paste <(echo "$a") <(echo "$b") | awk '{n=NF/2; t1=0;t2=0; for(i=2;i<=n;i++){t1+=$i; t2+=$(i+n)}; i1=$5+$6; i2=$(5+n)+$(6+n); printf "%s %.0f%% ", $1, 100*(1-(i2-i1)/(t2-t1))}'
}
waited=0
while [ "$waited" -lt "$IDLE_WAIT" ]; do
  b=$(busy 2); echo "machine: $b" >&2
  if echo "$b" | awk '{for(i=2;i<=NF;i+=2){gsub("%","",$i); if($i+0>15) exit 1}}'; then break; fi
  waited=$((waited+2))
done
ts=$(date -u +%Y%m%dT%H%M%SZ)
log=results/run-$ts.log
snap() { grep '^cpu[0-9]' /proc/stat; }
{
  echo "# $(date -u) kernel $(uname -r) katran $(git -C katran rev-parse HEAD)"
  echo "# cmd: flock /tmp/bench.lock taskset -c $CPU ./build/bench -c $CPU $*"
  echo "# before: $(busy 1)"
  s1=$(snap)
  flock /tmp/bench.lock taskset -c "$CPU" ./build/bench -c "$CPU" "$@"
  s2=$(snap)
  echo "# cpu busy during the run (incl. lock wait and setup): $(paste <(echo "$s1") <(echo "$s2") | awk '{n=NF/2; t1=0;t2=0; for(i=2;i<=n;i++){t1+=$i; t2+=$(i+n)}; i1=$5+$6; i2=$(5+n)+$(6+n); printf "%s %.0f%% ", $1, 100*(1-(i2-i1)/(t2-t1))}')"
} 2>&1 | tee "$log"
echo "log: $log"
