#!/bin/bash
# Interleaved A/B of two trees' servers under the same closed-loop load (64 clients, 15 s), twice.
set -u
PY=${PYTHON:-$(git rev-parse --show-toplevel)/.venv/bin/python}
for round in 1 2; do
  for side in before after; do
    dir=${BEFORE_TREE:?a checkout of the commit to compare}; [ $side = after ] && dir=$(git rev-parse --show-toplevel)
    (cd $dir && exec $PY -m service.server.app --host 127.0.0.1 --port 19001 --metrics-port 19002 --http-port 19000 --log-level WARNING > ${OUT:-/tmp}/ab-$side.log 2>&1) &
    pid=$!
    for i in $(seq 60); do curl -s -o /dev/null -w '%{http_code}' 127.0.0.1:19000/v2/health/ready 2>/dev/null | grep -q 200 && break; sleep 0.5; done
    # the 'before' tree also has REST (it is after the REST commits)
    $PY -m bench.cli load --server 127.0.0.1:19001 --metrics 127.0.0.1:19002 --server-pid $pid --concurrency 64 --duration 15 --warmup 3 --json ${OUT:-/tmp}/ab-$side-$round.json 2>&1 | grep "closed c=64" | sed "s/^/[$side $round] /"
    kill -TERM $pid; wait $pid
  done
done
