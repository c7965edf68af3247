#!/usr/bin/env bash
# deploy/autoscale_check.sh — proves the autoscaling signal end to end with a real Prometheus:
# overloads one finserve replica (48 concurrent /v1/generate requests against
# --max-batch-size 4), lets Debian's `prometheus` scrape it every second, and evaluates through
# Prometheus' HTTP API the exact queries of the KEDA ScaledObject
# (deploy/k8s/components/keda/scaledobject.yaml) and of the prometheus-adapter rules, divided
# per replica as the HPA does. Passes when the raw finserve_queue_size reached >= 20 and the
# queue trigger crossed its threshold during the overload, and everything came back below
# after it. See deploy/autoscale_check.py for the details. Takes about a minute.
#
#   bash deploy/autoscale_check.sh [FINSERVE_BINARY]
#
# The binary: the argument, else $FINSERVE_BIN, else ${CARGO_TARGET_DIR:-target}/debug/finserve
# (build it first: cargo build). Needs `prometheus` (Debian package, installed by .ci/setup)
# and Python 3 (.ci/venv's when present, for PyYAML; plain python3 works too, without the
# prometheus-adapter part). Only loopback ports are used; every process started is stopped.
# Extra options go to the helper via AUTOSCALE_CHECK_ARGS, e.g. "--load-seconds 30 --keep".
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
cd "$ROOT"
BIN=${1:-${FINSERVE_BIN:-${CARGO_TARGET_DIR:-target}/debug/finserve}}
PY=python3
[ -x "$ROOT/.ci/venv/bin/python" ] && PY="$ROOT/.ci/venv/bin/python"
command -v prometheus >/dev/null || { echo "autoscale_check: FAIL (no prometheus binary; run .ci/setup or apt-get install prometheus)"; exit 2; }
[ -x "$BIN" ] || { echo "autoscale_check: FAIL (no finserve binary at $BIN; cargo build, or pass its path)"; exit 2; }
# exec: signals reach the helper directly, which stops finserve and Prometheus on any exit
# shellcheck disable=SC2086
exec "$PY" "$HERE/autoscale_check.py" --finserve "$BIN" ${AUTOSCALE_CHECK_ARGS:-}
