#!/usr/bin/env python3
"""Validate rendered Kubernetes manifests (multi-document YAML files) — run by deploy/validate.sh.

* Built-in kinds: JSON schema validation with `kubernetes-validate` (the Kubernetes OpenAPI
  schemas it bundles), strict mode (unknown fields are errors), for every version in
  --k8s-version (repeatable).
* Prometheus Operator kinds (PodMonitor, ServiceMonitor, PrometheusRule): validated with the
  pydantic models of `cloudcoil-models-prometheus-operator`, which are generated from the
  operator's CRD OpenAPI schemas (types, enums, patterns such as the duration format); unknown
  fields, which those models would silently drop, are reported as errors too.
* Any other kind fails: there is no schema for it here.
* finserve-specific checks: probes on /health and /ready, non-root + read-only root filesystem
  with a writable /tmp, resources, the model-cache volume, Service/PodMonitor selectors matching
  the pod labels, the HPA targeting the Deployment and scaling on finserve_queue_size, and (with
  --expect-gpu) an nvidia.com/gpu limit.

Exit 0 when everything passes, else 1.
"""
from __future__ import annotations

import argparse
import sys

import yaml

import kubernetes_validate

PROM_OPERATOR_GROUP = "monitoring.coreos.com"


def load_docs(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def name_of(doc):
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def dropped_keys(given, kept, prefix=""):
    """Keys present in `given` but absent from `kept` (a pydantic round trip)."""
    out = []
    if isinstance(given, dict) and isinstance(kept, dict):
        for k, v in given.items():
            if k not in kept:
                out.append(f"{prefix}{k}")
            else:
                out += dropped_keys(v, kept[k], f"{prefix}{k}.")
    elif isinstance(given, list) and isinstance(kept, list):
        for i, (g, k) in enumerate(zip(given, kept)):
            out += dropped_keys(g, k, f"{prefix}{i}.")
    return out


def validate_prometheus_operator(doc):
    try:
        from cloudcoil.models.prometheus_operator import v1 as pov1
    except ImportError as e:  # pragma: no cover
        return [f"cannot import cloudcoil.models.prometheus_operator: {e}"]
    api_version = doc.get("apiVersion", "")
    if api_version != f"{PROM_OPERATOR_GROUP}/v1":
        return [f"unsupported apiVersion {api_version} (have schemas for {PROM_OPERATOR_GROUP}/v1)"]
    model = getattr(pov1, doc.get("kind", ""), None)
    if model is None:
        return [f"no schema for kind {doc.get('kind')} in {PROM_OPERATOR_GROUP}/v1"]
    try:
        obj = model.model_validate(doc)
    except Exception as e:  # pydantic.ValidationError
        return [str(e)]
    kept = obj.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return [f"unknown field {k}" for k in dropped_keys(doc, kept)]


def container_checks(doc, expect_gpu):
    problems = []
    spec = doc["spec"]["template"]["spec"]
    pod_labels = doc["spec"]["template"]["metadata"].get("labels", {})
    sel = doc["spec"]["selector"].get("matchLabels", {})
    if any(pod_labels.get(k) != v for k, v in sel.items()):
        problems.append("selector does not match the pod template labels")
    psc = spec.get("securityContext", {})
    if not psc.get("runAsNonRoot"):
        problems.append("pod securityContext.runAsNonRoot is not true")
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    for c in spec["containers"]:
        where = f"container {c['name']}"
        sc = c.get("securityContext", {})
        if not sc.get("readOnlyRootFilesystem"):
            problems.append(f"{where}: readOnlyRootFilesystem is not true")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        probes = {p: c.get(p, {}).get("httpGet", {}).get("path") for p in
                  ("readinessProbe", "livenessProbe", "startupProbe")}
        if probes["readinessProbe"] != "/ready":
            problems.append(f"{where}: readinessProbe is not GET /ready ({probes['readinessProbe']})")
        if probes["livenessProbe"] != "/health":
            problems.append(f"{where}: livenessProbe is not GET /health ({probes['livenessProbe']})")
        sp = c.get("startupProbe")
        if probes["startupProbe"] != "/ready":
            problems.append(f"{where}: startupProbe is not GET /ready (/health is 200 while loading)")
        if not sp:
            problems.append(f"{where}: no startupProbe")
        else:
            budget = sp.get("periodSeconds", 10) * sp.get("failureThreshold", 3)
            if budget < 600:
                problems.append(f"{where}: startupProbe allows only {budget}s for loading a model (< 600s)")
        res = c.get("resources", {})
        for k in ("requests", "limits"):
            if not res.get(k, {}).get("memory"):
                problems.append(f"{where}: no resources.{k}.memory")
        if not res.get("requests", {}).get("cpu"):
            problems.append(f"{where}: no resources.requests.cpu (the HPA's CPU metric needs it)")
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        if "/tmp" not in mounts:
            problems.append(f"{where}: no writable /tmp volume (root filesystem is read-only)")
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        hf_home = env.get("HF_HOME", "/data/hf")
        if not any(hf_home.startswith(p.rstrip("/") + "/") or hf_home == p for p in mounts):
            problems.append(f"{where}: HF_HOME={hf_home} is not on a mounted volume (model cache)")
        for m in c.get("volumeMounts", []):
            if m["name"] not in vols:
                problems.append(f"{where}: volumeMount {m['name']} has no volume")
        if not any(p.get("containerPort") == 8080 for p in c.get("ports", [])):
            problems.append(f"{where}: no containerPort 8080")
        gpu = res.get("limits", {}).get("nvidia.com/gpu")
        if expect_gpu and str(gpu) != "1":
            problems.append(f"{where}: expected limits nvidia.com/gpu: 1, got {gpu}")
        if not expect_gpu and gpu is not None:
            problems.append(f"{where}: unexpected nvidia.com/gpu limit in a CPU manifest")
    return problems, pod_labels


def cross_checks(docs, expect_gpu):
    problems = []
    deployments = [d for d in docs if d.get("kind") == "Deployment"]
    if len(deployments) != 1:
        return [f"expected exactly one Deployment, found {len(deployments)}"]
    dep = deployments[0]
    p, pod_labels = container_checks(dep, expect_gpu)
    problems += [f"{name_of(dep)}: {x}" for x in p]

    def selects(match):
        return bool(match) and all(pod_labels.get(k) == v for k, v in match.items())

    kinds = {d.get("kind") for d in docs}
    for need in ("Service", "HorizontalPodAutoscaler"):
        if need not in kinds:
            problems.append(f"no {need}")
    if not kinds & {"PodMonitor", "ServiceMonitor"}:
        problems.append("no PodMonitor or ServiceMonitor")
    for d in docs:
        kind = d.get("kind")
        if kind == "Service" and not selects(d["spec"].get("selector", {})):
            problems.append(f"{name_of(d)}: selector does not select the finserve pods")
        if kind == "PodMonitor" and not selects(d["spec"]["selector"].get("matchLabels", {})):
            problems.append(f"{name_of(d)}: selector does not select the finserve pods")
        if kind == "HorizontalPodAutoscaler":
            ref = d["spec"]["scaleTargetRef"]
            if ref.get("kind") != "Deployment" or ref.get("name") != dep["metadata"]["name"]:
                problems.append(f"{name_of(d)}: scaleTargetRef {ref} is not the Deployment")
            names = [m.get("pods", {}).get("metric", {}).get("name") for m in d["spec"].get("metrics", [])]
            if "finserve_queue_size" not in names:
                problems.append(f"{name_of(d)}: does not scale on the finserve_queue_size pods metric")
        if kind == "PodDisruptionBudget" and not selects(d["spec"]["selector"].get("matchLabels", {})):
            problems.append(f"{name_of(d)}: selector does not select the finserve pods")
    return problems


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--k8s-version", action="append", default=None,
                    help="Kubernetes version(s) to validate against (default: 1.29.0 and the newest bundled)")
    ap.add_argument("--expect-gpu", action="store_true")
    args = ap.parse_args(argv)
    versions = args.k8s_version or ["1.29.0", kubernetes_validate.latest_version()]
    failed = False
    for path in args.files:
        docs = load_docs(path)
        problems = []
        counts = {"schema": 0, "crd": 0}
        for doc in docs:
            kind, api = doc.get("kind"), doc.get("apiVersion", "")
            if api.split("/")[0] == PROM_OPERATOR_GROUP:
                errs = validate_prometheus_operator(doc)
                problems += [f"{name_of(doc)} [{api} CRD schema]: {e}" for e in errs]
                counts["crd"] += 1
                continue
            for v in versions:
                try:
                    kubernetes_validate.validate(doc, v, strict=True)
                except kubernetes_validate.SchemaNotFoundError:
                    problems.append(f"{name_of(doc)}: no schema for {api} {kind} in Kubernetes {v}")
                except kubernetes_validate.ValidationError as e:
                    loc = "/".join(str(x) for x in e.path)
                    problems.append(f"{name_of(doc)} [k8s {v}]: {loc}: {e.message}")
            counts["schema"] += 1
        problems += cross_checks(docs, args.expect_gpu)
        if problems:
            failed = True
            for p in problems:
                print(f"FAIL {path}: {p}", file=sys.stderr)
        else:
            print(f"ok: {path}: {counts['schema']} objects valid against Kubernetes "
                  f"{', '.join(versions)} (strict), {counts['crd']} Prometheus Operator object(s) "
                  f"valid against the monitoring.coreos.com/v1 CRD schema; finserve checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
