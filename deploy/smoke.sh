#!/usr/bin/env bash
# deploy/smoke.sh — build the finserve image and run the compose stack for real, with podman.
#
#   sudo bash deploy/smoke.sh            # from anywhere; needs root (rootful podman)
#
# 1. ../shared/tools/container-setup.sh: podman, podman-compose, runc, and local stand-ins for
#    the rust:1-bookworm / debian:bookworm-slim base images (no container registry is reachable
#    on CI machines); plus iptables, which podman's bridge networks need.
# 2. Builds the finserve image from the repo's Dockerfile (target `runtime`) and a local
#    Prometheus image from Debian's `prometheus` package (deploy/prometheus/Dockerfile): the
#    official prom/prometheus and grafana/grafana images cannot be pulled here. Checks the
#    image's contract: non-root, port, health check, OCI licence/revision labels, and the
#    licence notices in /usr/share/licenses/finserve.
# 3. podman-compose -f docker-compose.yml -f compose.smoke.yml up finserve prometheus
#    (the smoke override swaps in the local Prometheus image; Grafana is NOT started because no
#    Grafana build is reachable from here; its dashboard is checked by check_dashboard.py).
# 4. Waits for the finserve container's health check and for /ready; sends /v1/sentiment and
#    /v1/generate through the published port (127.0.0.1 only); checks /health, /info, /metrics;
#    checks the dashboard's queries against the real /metrics scrape.
# 5. Asks Prometheus' HTTP API (published on 127.0.0.1) that the finserve target is up and that
#    finserve_requests_total has samples.
# 6. Tears everything down (trap), also on failure (after printing the containers' logs).
#
# Knobs (env): SMOKE_FINSERVE_PORT (18080), SMOKE_PROMETHEUS_PORT (19090),
#   SMOKE_READY_TIMEOUT (600 s; model load + merge + warm-up), SMOKE_KEEP=1 (leave the stack up),
#   SMOKE_SKIP_SETUP=1 (skip container-setup.sh), SMOKE_CONTEXT (build context; default repo root),
#   CONTAINER_SETUP (path to container-setup.sh), SMOKE_NICE (nice level for the builds, 10).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
CONTEXT=${SMOKE_CONTEXT:-$ROOT}
PROJECT=finserve-smoke
FPORT=${SMOKE_FINSERVE_PORT:-18080}
PPORT=${SMOKE_PROMETHEUS_PORT:-19090}
READY_TIMEOUT=${SMOKE_READY_TIMEOUT:-600}
NICE=${SMOKE_NICE:-10}
IMAGE=localhost/finserve:smoke
PROM_IMAGE=localhost/finserve-prometheus:smoke
SETUP=${CONTAINER_SETUP:-$ROOT/../shared/tools/container-setup.sh}
WORK=$(mktemp -d /tmp/finserve-smoke.XXXXXX)
T0=$SECONDS

log()  { printf '[smoke %s +%ss] %s\n' "$(date +%T)" "$((SECONDS - T0))" "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }

[ "$(id -u)" = 0 ] || fail "run as root (rootful podman is what works in this sandbox)"

# ------------------------------------------------------------------------------- 1. setup
if [ "${SMOKE_SKIP_SETUP:-0}" != 1 ]; then
  [ -f "$SETUP" ] || fail "container-setup.sh not found at $SETUP (set CONTAINER_SETUP)"
  log "container-setup: $SETUP"
  bash "$SETUP"
fi
for tool in podman podman-compose podman-wait-healthy curl python3; do
  command -v "$tool" >/dev/null || fail "$tool missing (container-setup.sh installs podman*, apt-get install curl python3)"
done
# netavark's bridge networks (compose's default network) need the iptables binary
if ! command -v iptables >/dev/null; then
  log "apt-get install iptables (podman bridge networking)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables >/dev/null; }
fi

compose() {
  (cd "$HERE" && FINSERVE_IMAGE=$IMAGE FINSERVE_PUBLISHED_PORT=$FPORT PROMETHEUS_PUBLISHED_PORT=$PPORT \
     BUILDAH_FORMAT=docker podman-compose -p "$PROJECT" -f docker-compose.yml -f compose.smoke.yml "$@")
}

teardown() {
  local rc=$?
  set +e
  if [ "$rc" != 0 ]; then
    log "failed (rc=$rc): container states and logs follow"
    podman ps -a --filter "label=io.podman.compose.project=$PROJECT" \
      --format '{{.Names}} {{.Status}}' >&2
    for c in $(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}'); do
      echo "----- logs $c (last 60 lines)" >&2; podman logs --tail 60 "$c" >&2 2>&1
    done
  fi
  if [ "${SMOKE_KEEP:-0}" = 1 ]; then
    log "SMOKE_KEEP=1: stack left running (finserve 127.0.0.1:$FPORT, prometheus 127.0.0.1:$PPORT)"
  else
    log "teardown"
    compose down -v >/dev/null 2>&1
    # podman-compose 1.0.x leaves the project network behind
    podman network ls --format '{{.Name}}' | grep -E "^${PROJECT}_" | xargs -r podman network rm -f >/dev/null 2>&1
    podman volume ls --format '{{.Name}}' | grep -E "^${PROJECT}_" | xargs -r podman volume rm -f >/dev/null 2>&1
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT TERM

# -------------------------------------------------------------------------------- 2. build
# Builds go through podman directly (not compose) for --network host (cargo fetches crates)
# and --format docker (keeps HEALTHCHECK). The Dockerfile's dependency layer is cached by
# podman between runs on the same machine, so a rebuild after a src/ change only compiles the
# finserve crate.
[ -f "$CONTEXT/models/demo/base/config.json" ] || fail "no demo model at $CONTEXT/models/demo/base"
log "podman build $IMAGE (context $CONTEXT; a cold build compiles all dependencies: ~15 min on 2 cores)"
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$CONTEXT/Cargo.toml" | head -1)
REVISION=$(git -C "$CONTEXT" rev-parse HEAD 2>/dev/null || echo unknown)
nice -n "$NICE" podman build --format docker --network host --pull=never --target runtime \
    --build-arg FINSERVE_VERSION="$VERSION" --build-arg FINSERVE_REVISION="$REVISION" \
    --build-arg FINSERVE_CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    -t "$IMAGE" -f "$CONTEXT/Dockerfile" "$CONTEXT" > "$WORK/build-finserve.log" 2>&1 \
  || { tail -40 "$WORK/build-finserve.log" >&2; fail "finserve image build failed"; }
log "built $IMAGE ($(podman image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}'))"
log "podman build $PROM_IMAGE (Debian's prometheus package)"
nice -n "$NICE" podman build --format docker --network host --pull=never \
    -t "$PROM_IMAGE" "$HERE/prometheus" > "$WORK/build-prometheus.log" 2>&1 \
  || { tail -40 "$WORK/build-prometheus.log" >&2; fail "prometheus image build failed"; }

# image contract: non-root, port, health check kept (--format docker)
user=$(podman image inspect "$IMAGE" --format '{{.Config.User}}')
[ -n "$user" ] && [ "${user%%:*}" != 0 ] && [ "${user%%:*}" != root ] || fail "image runs as root (User=$user)"
podman image inspect "$IMAGE" --format '{{json .Config.Healthcheck}}' | grep -q finserve-healthcheck \
  || fail "image has no HEALTHCHECK (built without --format docker?)"
podman image inspect "$IMAGE" --format '{{json .Config.ExposedPorts}}' | grep -q '8080/tcp' || fail "8080 not exposed"
# licences: OCI labels, and the notices of finserve and of the demo model's training sets
lic=$(podman image inspect "$IMAGE" --format '{{index .Config.Labels "org.opencontainers.image.licenses"}}')
[ "$lic" = "Apache-2.0 AND CC-BY-NC-SA-3.0" ] || fail "org.opencontainers.image.licenses is '$lic'"
[ "$(podman image inspect "$IMAGE" --format '{{index .Config.Labels "org.opencontainers.image.revision"}}')" = "$REVISION" ] \
  || fail "org.opencontainers.image.revision is not $REVISION"
podman run --rm --network none --entrypoint /bin/cat "$IMAGE" /opt/finserve/build-info | grep -qx "revision=$REVISION" \
  || fail "/opt/finserve/build-info does not name revision $REVISION"
podman run --rm --network none --entrypoint /bin/sh "$IMAGE" -c '
  cd /usr/share/licenses/finserve &&
  for f in NOTICE LICENSE-Apache-2.0 demo-model/README.md \
           financial_phrasebank/NOTICE financial_phrasebank/License.txt financial_phrasebank/README.txt \
           financial_phrasebank/PROVENANCE.md twitter_financial_news_sentiment/NOTICE \
           twitter_financial_news_sentiment/PROVENANCE.md /opt/finserve/models/demo/README.md; do
    test -s "$f" || { echo "missing $f"; exit 1; }
  done
  grep -q "Attribution-NonCommercial-ShareAlike 3.0" financial_phrasebank/License.txt &&
  grep -q "Apache License" LICENSE-Apache-2.0' >&2 \
  || fail "licence files missing from /usr/share/licenses/finserve in the image"
log "image labels: licenses=$lic revision=$REVISION; licence notices in /usr/share/licenses/finserve"

# --------------------------------------------------------------------------------- 3. up
compose down -v >/dev/null 2>&1 || true          # leftovers of an interrupted run
log "podman-compose up finserve prometheus"
compose up -d --no-build finserve prometheus > "$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; fail "compose up failed"; }
ctr() {   # container name of a compose service
  podman ps -a --filter "label=io.podman.compose.project=$PROJECT" \
    --filter "label=com.docker.compose.service=$1" --format '{{.Names}}' | head -1
}
FCTR=$(ctr finserve); PCTR=$(ctr prometheus)
# podman-compose can exit 0 although a container did not start: check for ourselves
[ -n "$FCTR" ] && [ -n "$PCTR" ] || { cat "$WORK/up.log" >&2; fail "compose did not create both containers"; }
for c in "$FCTR" "$PCTR"; do
  [ "$(podman inspect "$c" --format '{{.State.Running}}')" = true ] \
    || { cat "$WORK/up.log" >&2; fail "container $c is not running"; }
done
log "containers: $FCTR, $PCTR"

# ------------------------------------------------------------------------------ 4. finserve
# Health checks do not run by themselves under podman without systemd: podman-wait-healthy
# runs the compose-defined one (finserve-healthcheck /ready) until it passes.
log "waiting for $FCTR to be healthy (up to ${READY_TIMEOUT}s)"
podman-wait-healthy "$FCTR" "$READY_TIMEOUT" >&2 || fail "$FCTR not healthy after ${READY_TIMEOUT}s"
BASE=http://127.0.0.1:$FPORT
for path in /health /ready; do
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 "$BASE$path")
  [ "$code" = 200 ] || fail "GET $path -> $code"
done
[ "$(podman exec "$FCTR" id -u)" != 0 ] || fail "finserve runs as root inside the container"

curl -sf --max-time 10 "$BASE/info" > "$WORK/info.json" || fail "GET /info failed"
log "GET /info: $(head -c 300 "$WORK/info.json")"

post() {   # post PATH JSON OUTFILE -> HTTP code
  curl -s -o "$3" -w '%{http_code}' --max-time 120 -H 'Content-Type: application/json' -d "$2" "$BASE$1"
}
code=$(post /v1/sentiment '{"inputs": "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in the corresponding period in 2007."}' "$WORK/sentiment.json")
[ "$code" = 200 ] || fail "POST /v1/sentiment -> $code: $(cat "$WORK/sentiment.json")"
python3 - "$WORK/sentiment.json" <<'EOF' || fail "unexpected /v1/sentiment response: $(cat "$WORK/sentiment.json")"
import json, sys
r = json.load(open(sys.argv[1]))
assert isinstance(r, list) and len(r) == 1 and isinstance(r[0], list) and r[0], r
labels = {e["label"] for e in r[0]}
assert labels <= {"negative", "neutral", "positive"} and labels, labels
assert abs(sum(e["score"] for e in r[0]) - 1.0) < 1e-3 or len(r[0]) < 3, r
print("  /v1/sentiment ->", r[0][0]["label"], round(r[0][0]["score"], 3), file=sys.stderr)
EOF
code=$(post /v1/generate '{"inputs": "The company reported a net loss for the quarter.", "parameters": {"max_new_tokens": 5}}' "$WORK/generate.json")
[ "$code" = 200 ] || fail "POST /v1/generate -> $code: $(cat "$WORK/generate.json")"
python3 - "$WORK/generate.json" <<'EOF' || fail "unexpected /v1/generate response: $(cat "$WORK/generate.json")"
import json, sys
r = json.load(open(sys.argv[1]))
if isinstance(r, list):   # TGI also answers [{"generated_text": ...}] in some versions
    r = r[0]
assert isinstance(r.get("generated_text"), str), r
print("  /v1/generate ->", repr(r["generated_text"]), file=sys.stderr)
EOF
# a few more requests, so that the rate() panels have something to show
for i in 1 2 3; do post /v1/sentiment '{"inputs": "Sales decreased by 5 %."}' /dev/null >/dev/null; done
code=$(post /v1/sentiment '{"inputs": ""}' "$WORK/err.json")
log "POST /v1/sentiment with empty input -> $code (expected 4xx)"
case $code in 4??) ;; *) fail "empty input was not rejected with 4xx: $code $(cat "$WORK/err.json")" ;; esac

curl -sf --max-time 10 "$BASE/metrics" > "$WORK/metrics.txt" || fail "GET /metrics failed"
for m in finserve_requests_total finserve_request_duration_seconds_bucket finserve_queue_size \
         finserve_batch_size_bucket finserve_sentiment_predictions_total process_resident_memory_bytes; do
  grep -q "^$m" "$WORK/metrics.txt" || fail "/metrics has no $m"
done
python3 "$HERE/check_dashboard.py" --metrics-file "$WORK/metrics.txt" >&2 \
  || fail "the Grafana dashboard queries a metric the running finserve does not export"
if podman run --rm -i --network none --entrypoint promtool "$PROM_IMAGE" check metrics \
     < "$WORK/metrics.txt" > "$WORK/promtool.txt" 2>&1; then
  log "promtool check metrics: ok"
else
  log "promtool check metrics reported problems (not fatal here; see issue 3):"; cat "$WORK/promtool.txt" >&2
fi

# ---------------------------------------------------------------------------- 5. prometheus
PROM=http://127.0.0.1:$PPORT
log "waiting for Prometheus to scrape finserve"
deadline=$((SECONDS + 120)); up=""; samples=""
while [ $SECONDS -lt $deadline ]; do
  curl -sf --max-time 5 "$PROM/api/v1/targets?state=active" > "$WORK/targets.json" 2>/dev/null || { sleep 2; continue; }
  up=$(python3 -c '
import json, sys
t = json.load(open(sys.argv[1]))["data"]["activeTargets"]
print(" ".join(x["health"] for x in t if x["labels"].get("job") == "finserve"))' "$WORK/targets.json" 2>/dev/null || true)
  curl -sf --max-time 5 -G "$PROM/api/v1/query" --data-urlencode 'query=sum(finserve_requests_total)' \
    > "$WORK/query.json" 2>/dev/null || true
  samples=$(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))["data"]["result"]
print(r[0]["value"][1] if r else "")' "$WORK/query.json" 2>/dev/null || true)
  if [ "$up" = up ] && [ -n "$samples" ]; then break; fi
  sleep 2
done
[ "$up" = up ] || fail "Prometheus does not report the finserve target up (health: '${up:-no target}'): $(head -c 800 "$WORK/targets.json")"
[ -n "$samples" ] || fail "Prometheus has no samples of finserve_requests_total: $(cat "$WORK/query.json")"
log "Prometheus: finserve target up, sum(finserve_requests_total) = $samples"
curl -sf --max-time 5 -G "$PROM/api/v1/query" --data-urlencode 'query=up{job="finserve"}' | grep -q '"1"\]' \
  || fail 'up{job="finserve"} is not 1'

log "PASS: image built, stack up, /v1/sentiment and /v1/generate answered, Prometheus scraping finserve ($((SECONDS - T0))s)"
