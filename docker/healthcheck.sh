#!/bin/sh
# Docker HEALTHCHECK for the worker image.
# A worker container (the image's default command) is healthy while the worker's own health
# endpoint answers: it reports a worker that has stopped polling the Prefect API. A flow-run
# container that a Docker work pool started has no endpoint and is healthy while it runs.
set -eu
if tr '\0' ' ' < /proc/1/cmdline | grep -q "worker start"; then
  exec python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' \
    "http://127.0.0.1:${PREFECT_WORKER_WEBSERVER_PORT:-8080}/health"
fi
exit 0
