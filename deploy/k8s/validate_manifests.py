#!/usr/bin/env python3
"""Validate one rendered kustomization (a multi-document YAML file) — run by deploy/validate.sh.

Schemas (nothing is skipped; a kind with no schema here fails):
* Built-in kinds: JSON schema validation with `kubernetes-validate` (the Kubernetes OpenAPI
  schemas it bundles), strict mode (unknown fields are errors), for every --k8s-version.
* Prometheus Operator kinds (monitoring.coreos.com/v1): the pydantic models of
  `cloudcoil-models-prometheus-operator`, generated from the operator's CRD OpenAPI schemas.
* KEDA kinds (keda.sh/v1alpha1, e.g. ScaledObject): the pydantic models of
  `cloudcoil-models-keda`, generated from KEDA's CRD OpenAPI schemas. The HPA that KEDA would
  create from a ScaledObject (its behaviour, bounds and external metrics) is also validated
  against the Kubernetes schemas.
  For both CRD model sets, fields the models do not know (which pydantic would silently drop)
  are reported as errors too.

finserve checks, driven by what the combination contains (--components, --gpu, --image):
* exactly the expected kinds, one object each; no CRD kind unless a component brings one;
* the Deployment: no `replicas` (the autoscaler owns it), probes on /health and /ready,
  non-root + read-only root filesystem with a writable /tmp, resources, the model cache, the
  expected image; with --gpu one nvidia.com/gpu, its toleration, no node selector;
* PodDisruptionBudget maxUnavailable: 1 (never minAvailable); selectors select the pods;
* exactly one autoscaler on the Deployment: the base HPA on CPU only, the prometheus-adapter
  HPA on the queue Pods metrics only (never mixed with CPU: an unreadable metric stops all
  scale-in), or a KEDA ScaledObject with Prometheus triggers on the queue gauges
  (AverageValue = per-replica thresholds, empty results are errors, fallback, scale-down
  stabilisation);
* the adapter rules (--adapter-values) publish every metric the HPA asks for;
* NetworkPolicy / PodMonitor when their components are in.

Exit 0 when everything passes, else 1.
"""
from __future__ import annotations

import argparse
import shlex
import sys

import yaml

import kubernetes_validate

PROM_OPERATOR_GROUP = "monitoring.coreos.com"
KEDA_GROUP = "keda.sh"
CRD_GROUPS = {PROM_OPERATOR_GROUP, KEDA_GROUP}
COMPONENTS = {"podmonitor", "keda", "prometheus-adapter", "networkpolicy", "api-key-file",
              "variants-file"}
QUEUE_METRIC = "finserve_queue_size"
QUEUE_METRICS = {"finserve_queue_size", "finserve_queue_oldest_seconds"}


def load_docs(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def name_of(doc):
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def group_of(doc):
    api = doc.get("apiVersion", "")
    return api.split("/")[0] if "/" in api else ""


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


def validate_crd_model(doc, module, version):
    """Validate `doc` with the cloudcoil pydantic model of its kind in `module` (one API version)."""
    api_version = doc.get("apiVersion", "")
    if api_version.split("/")[-1] != version:
        return [f"unsupported apiVersion {api_version} (have schemas for {version} only)"]
    model = getattr(module, doc.get("kind", ""), None)
    if model is None or not isinstance(model, type):
        return [f"no schema for kind {doc.get('kind')} in {api_version}"]
    try:
        obj = model.model_validate(doc)
    except Exception as e:  # pydantic.ValidationError
        return [str(e)]
    kept = obj.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return [f"unknown field {k}" for k in dropped_keys(doc, kept)]


def validate_builtin(doc, versions):
    problems = []
    kind, api = doc.get("kind"), doc.get("apiVersion", "")
    for v in versions:
        try:
            kubernetes_validate.validate(doc, v, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{name_of(doc)}: no schema for {api} {kind} in Kubernetes {v}")
        except kubernetes_validate.ValidationError as e:
            loc = "/".join(str(x) for x in e.path)
            problems.append(f"{name_of(doc)} [k8s {v}]: {loc}: {e.message}")
    return problems


def schema_problems(doc, versions):
    """(problems, which validator) for one object."""
    group = group_of(doc)
    if group == PROM_OPERATOR_GROUP:
        from cloudcoil.models.prometheus_operator import v1 as pov1
        errs = validate_crd_model(doc, pov1, "v1")
        return [f"{name_of(doc)} [{doc['apiVersion']} CRD schema]: {e}" for e in errs], "crd"
    if group == KEDA_GROUP:
        from cloudcoil.models.keda import v1alpha1 as kedav1alpha1
        errs = validate_crd_model(doc, kedav1alpha1, "v1alpha1")
        return [f"{name_of(doc)} [{doc['apiVersion']} CRD schema]: {e}" for e in errs], "crd"
    # everything else must be a built-in kind: any other CRD fails here with "no schema"
    return validate_builtin(doc, versions), "k8s"


# ------------------------------------------------------------------------------ finserve checks

def container_checks(dep, gpu, image):
    problems = []
    spec = dep["spec"]["template"]["spec"]
    pod_labels = dep["spec"]["template"]["metadata"].get("labels", {})
    sel = dep["spec"]["selector"].get("matchLabels", {})
    if "replicas" in dep["spec"]:
        problems.append(f"spec.replicas is set ({dep['spec']['replicas']}): it resets the "
                        "autoscaler's count on every apply; leave it to the HPA/KEDA")
    if any(pod_labels.get(k) != v for k, v in sel.items()):
        problems.append("selector does not match the pod template labels")
    psc = spec.get("securityContext", {})
    if not psc.get("runAsNonRoot"):
        problems.append("pod securityContext.runAsNonRoot is not true")
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    if gpu:
        if spec.get("nodeSelector"):
            problems.append(f"GPU pod has a nodeSelector {spec['nodeSelector']} (the device "
                            "plugin's nvidia.com/gpu request is enough; GFD labels may not exist)")
        if not any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])):
            problems.append("GPU pod does not tolerate the nvidia.com/gpu taint")
    for c in spec["containers"]:
        where = f"container {c['name']}"
        if image and c.get("image") != image:
            problems.append(f"{where}: image {c.get('image')!r}, expected {image!r}")
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
            if m.get("subPath") and vols.get(m["name"], {}).get("secret"):
                problems.append(f"{where}: secret volume {m['name']} mounted with subPath "
                                "(never updated: key rotation would need a restart)")
        if not any(p.get("containerPort") == 8080 for p in c.get("ports", [])):
            problems.append(f"{where}: no containerPort 8080")
        for k in ("limits", "requests"):
            g = res.get(k, {}).get("nvidia.com/gpu")
            if gpu and str(g) != "1":
                problems.append(f"{where}: expected {k} nvidia.com/gpu: 1, got {g}")
            if not gpu and g is not None:
                problems.append(f"{where}: unexpected nvidia.com/gpu {k} in a CPU manifest")
    return problems, pod_labels


def api_key_checks(dep, key_file):
    """FINSERVE_API_KEY (env, base) or FINSERVE_API_KEY_FILE on a whole-directory Secret mount."""
    problems = []
    spec = dep["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    c = spec["containers"][0]
    env = {e["name"]: e for e in c.get("env", [])}
    if not key_file:
        if "FINSERVE_API_KEY" not in env or "FINSERVE_API_KEY_FILE" in env:
            problems.append("expected FINSERVE_API_KEY from finserve-secrets and no FINSERVE_API_KEY_FILE")
        return problems
    if "FINSERVE_API_KEY" in env:
        problems.append("FINSERVE_API_KEY and FINSERVE_API_KEY_FILE together (finserve refuses to start)")
    path = env.get("FINSERVE_API_KEY_FILE", {}).get("value")
    if not path:
        return problems + ["no FINSERVE_API_KEY_FILE"]
    mounts = [m for m in c.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")]
    if not mounts or not vols.get(mounts[0]["name"], {}).get("secret"):
        problems.append(f"FINSERVE_API_KEY_FILE={path} is not on a Secret volume")
    elif mounts[0].get("subPath"):
        problems.append(f"FINSERVE_API_KEY_FILE={path}: Secret mounted with subPath (never updated)")
    return problems


def variants_file_checks(dep, variants_file):
    """FINSERVE_VARIANTS_FILE on a whole-directory ConfigMap mount, FINSERVE_ADAPTER_ROOT on a
    read-only volume; neither without the component."""
    spec = dep["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    c = spec["containers"][0]
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    if not variants_file:
        extra = {"FINSERVE_VARIANTS_FILE", "FINSERVE_ADAPTER_ROOT"} & set(env)
        return [f"{sorted(extra)} set without components/variants-file"] if extra else []
    problems = []

    def mount_of(path):
        mounts = [m for m in c.get("volumeMounts", [])
                  if (path or "").rstrip("/").startswith(m["mountPath"].rstrip("/"))]
        return mounts[0] if mounts else None

    m = mount_of(env.get("FINSERVE_VARIANTS_FILE"))
    if not m or not vols.get(m["name"], {}).get("configMap"):
        problems.append("FINSERVE_VARIANTS_FILE is not on a ConfigMap volume")
    elif m.get("subPath"):
        problems.append("FINSERVE_VARIANTS_FILE: ConfigMap mounted with subPath (never updated)")
    m = mount_of(env.get("FINSERVE_ADAPTER_ROOT"))
    if not m or m["name"] not in vols:
        problems.append("FINSERVE_ADAPTER_ROOT is not a mounted volume")
    elif not m.get("readOnly"):
        problems.append("FINSERVE_ADAPTER_ROOT: the adapter volume is writable (mount it readOnly)")
    return problems


def behavior_checks(where, behavior):
    problems = []
    down = (behavior or {}).get("scaleDown", {})
    if down.get("stabilizationWindowSeconds", 0) < 60:
        problems.append(f"{where}: scaleDown.stabilizationWindowSeconds < 60 (replicas take "
                        "minutes to load the model; they must not flap)")
    return problems


def hpa_checks(hpa, dep, mode, adapter_rules):
    where = name_of(hpa)
    problems = []
    spec = hpa["spec"]
    ref = spec["scaleTargetRef"]
    if ref.get("kind") != "Deployment" or ref.get("name") != dep["metadata"]["name"]:
        problems.append(f"{where}: scaleTargetRef {ref} is not the Deployment")
    if not 1 <= spec.get("minReplicas", 1) <= spec["maxReplicas"]:
        problems.append(f"{where}: bad bounds {spec.get('minReplicas')}..{spec['maxReplicas']}")
    metrics = spec.get("metrics", [])
    types = {m["type"] for m in metrics}
    if mode == "cpu":
        if [(m["type"], m.get("resource", {}).get("name")) for m in metrics] != [("Resource", "cpu")]:
            problems.append(f"{where}: the base HPA must scale on CPU only (a metric a plain "
                            f"cluster cannot serve stops every scale-in), got {metrics}")
    elif mode == "adapter":
        if types != {"Pods"}:
            problems.append(f"{where}: the prometheus-adapter HPA must use Pods metrics only "
                            f"(no CPU beside them: an unreadable metric stops every scale-in), got {types}")
        names = [m.get("pods", {}).get("metric", {}).get("name") for m in metrics]
        if QUEUE_METRIC not in names:
            problems.append(f"{where}: does not scale on the {QUEUE_METRIC} pods metric")
        for m in metrics:
            t = m.get("pods", {}).get("target", {})
            if t.get("type") != "AverageValue":
                problems.append(f"{where}: {m} target is not AverageValue (per replica)")
        if adapter_rules is not None:
            published = {r.get("name", {}).get("as") for r in adapter_rules.get("rules", {}).get("custom", [])}
            for n in names:
                if n not in published:
                    problems.append(f"{where}: metric {n} is not published by the prometheus-adapter rules")
    problems += behavior_checks(where, spec.get("behavior"))
    return problems


def keda_hpa(so):
    """The HPA KEDA would create for this ScaledObject (enough to schema-check behaviour/bounds)."""
    spec = so["spec"]
    ref = spec["scaleTargetRef"]
    hpa_cfg = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {})
    metrics = []
    for i, t in enumerate(spec["triggers"]):
        metrics.append({
            "type": "External",
            "external": {
                "metric": {"name": f"s{i}-{t['type']}",
                           "selector": {"matchLabels": {"scaledobject.keda.sh/name": so["metadata"]["name"]}}},
                "target": {"type": t.get("metricType", "AverageValue"),
                           ("averageValue" if t.get("metricType", "AverageValue") == "AverageValue" else "value"):
                               str(t["metadata"]["threshold"])},
            },
        })
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": hpa_cfg.get("name", f"keda-hpa-{so['metadata']['name']}")},
        "spec": {
            "scaleTargetRef": {"apiVersion": ref.get("apiVersion", "apps/v1"),
                               "kind": ref.get("kind", "Deployment"), "name": ref["name"]},
            "minReplicas": spec.get("minReplicaCount", 0) or 1,
            "maxReplicas": spec.get("maxReplicaCount", 100),
            "metrics": metrics,
        },
    }
    if "behavior" in hpa_cfg:
        hpa["spec"]["behavior"] = hpa_cfg["behavior"]
    return hpa


def scaledobject_checks(so, dep, versions):
    where = name_of(so)
    problems = []
    spec = so["spec"]
    ref = spec["scaleTargetRef"]
    if ref.get("kind", "Deployment") != "Deployment" or ref.get("name") != dep["metadata"]["name"]:
        problems.append(f"{where}: scaleTargetRef {ref} is not the Deployment")
    lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    if not 1 <= lo <= hi:
        problems.append(f"{where}: replica bounds {lo}..{hi} (never 0: a cold replica needs minutes)")
    fb = spec.get("fallback")
    if not fb:
        problems.append(f"{where}: no fallback (what happens when Prometheus is unreachable?)")
    elif not lo <= fb.get("replicas", -1) <= hi:
        problems.append(f"{where}: fallback.replicas {fb.get('replicas')} outside {lo}..{hi}")
    behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
    problems += behavior_checks(where, behavior)
    queries = []
    for t in spec["triggers"]:
        tw = f"{where} trigger {t.get('name', t['type'])}"
        md = t.get("metadata", {})
        if t["type"] != "prometheus":
            problems.append(f"{tw}: type {t['type']} (expected prometheus)")
            continue
        if t.get("metricType") != "AverageValue":
            problems.append(f"{tw}: metricType {t.get('metricType')} (AverageValue: threshold per replica)")
        for k in ("serverAddress", "query", "threshold"):
            if not md.get(k):
                problems.append(f"{tw}: no metadata.{k}")
        try:
            if float(md.get("threshold", "x")) <= 0:
                problems.append(f"{tw}: threshold must be > 0")
        except ValueError:
            problems.append(f"{tw}: threshold {md.get('threshold')!r} is not a number")
        if md.get("ignoreNullValues") != "false":
            problems.append(f"{tw}: ignoreNullValues must be \"false\" (an empty result is a broken "
                            "scrape or selector, not an empty queue)")
        q = md.get("query", "")
        if not q.replace(" ", "").startswith("sum("):
            problems.append(f"{tw}: query {q!r} must sum over the replicas (AverageValue divides by them)")
        queries.append(q)
    if not any(QUEUE_METRIC + "{" in q for q in queries):
        problems.append(f"{where}: no trigger on {QUEUE_METRIC}")
    for q in queries:
        if not any(m + "{" in q for m in QUEUE_METRICS):
            problems.append(f"{where}: query {q!r} reads none of {sorted(QUEUE_METRICS)}")
    problems += [f"{where} (as KEDA's HPA) {p}" for p in validate_builtin(keda_hpa(so), versions)]
    return problems


def networkpolicy_checks(np, selects):
    where = name_of(np)
    problems = []
    spec = np["spec"]
    if not selects(spec.get("podSelector", {}).get("matchLabels", {})):
        problems.append(f"{where}: podSelector does not select the finserve pods")
    if set(spec.get("policyTypes", [])) != {"Ingress", "Egress"}:
        problems.append(f"{where}: policyTypes {spec.get('policyTypes')} (expected Ingress and Egress)")
    in_ports = {p.get("port") for r in spec.get("ingress", []) for p in r.get("ports", [])}
    if not in_ports & {"http", 8080}:
        problems.append(f"{where}: no ingress rule for the API port (http/8080)")
    out = {(p.get("port"), p.get("protocol", "TCP")) for r in spec.get("egress", []) for p in r.get("ports", [])}
    for need in ((53, "UDP"), (53, "TCP"), (443, "TCP")):
        if need not in out:
            problems.append(f"{where}: no egress for {need[1]} {need[0]}")
    return problems


def cross_checks(docs, components, gpu, image, versions, adapter_rules):
    problems = []
    kinds = [d.get("kind") for d in docs]
    expected = {"ServiceAccount", "ConfigMap", "Service", "Deployment", "PodDisruptionBudget"}
    expected.add("ScaledObject" if "keda" in components else "HorizontalPodAutoscaler")
    if "podmonitor" in components:
        expected.add("PodMonitor")
    if "networkpolicy" in components:
        expected.add("NetworkPolicy")
    if sorted(kinds) != sorted(expected):
        problems.append(f"kinds {sorted(kinds)}, expected exactly one each of {sorted(expected)}")
    crd = [name_of(d) for d in docs if group_of(d) in CRD_GROUPS]
    if not components & {"podmonitor", "keda"} and crd:
        problems.append(f"CRD kinds {crd} in a combination that must apply on a plain cluster")
    deployments = [d for d in docs if d.get("kind") == "Deployment"]
    if len(deployments) != 1:
        return problems + [f"expected exactly one Deployment, found {len(deployments)}"]
    dep = deployments[0]
    p, pod_labels = container_checks(dep, gpu, image)
    p += api_key_checks(dep, "api-key-file" in components)
    p += variants_file_checks(dep, "variants-file" in components)
    problems += [f"{name_of(dep)}: {x}" for x in p]

    def selects(match):
        return bool(match) and all(pod_labels.get(k) == v for k, v in match.items())

    autoscalers = [d for d in docs if d.get("kind") in ("HorizontalPodAutoscaler", "ScaledObject")]
    if len(autoscalers) != 1:
        problems.append(f"expected exactly one autoscaler, found {[name_of(a) for a in autoscalers]}")
    mode = "keda" if "keda" in components else "adapter" if "prometheus-adapter" in components else "cpu"
    for d in docs:
        kind = d.get("kind")
        if kind == "Service" and not selects(d["spec"].get("selector", {})):
            problems.append(f"{name_of(d)}: selector does not select the finserve pods")
        if kind == "PodMonitor":
            if not selects(d["spec"]["selector"].get("matchLabels", {})):
                problems.append(f"{name_of(d)}: selector does not select the finserve pods")
            relabel = [r for e in d["spec"]["podMetricsEndpoints"] for r in e.get("relabelings", [])]
            if not any(r.get("targetLabel") == "job" and r.get("replacement") == "finserve" for r in relabel):
                problems.append(f"{name_of(d)}: does not set job=\"finserve\" (dashboard and KEDA queries need it)")
        if kind == "HorizontalPodAutoscaler":
            problems += hpa_checks(d, dep, mode, adapter_rules)
        if kind == "ScaledObject":
            problems += scaledobject_checks(d, dep, versions)
        if kind == "PodDisruptionBudget":
            if not selects(d["spec"]["selector"].get("matchLabels", {})):
                problems.append(f"{name_of(d)}: selector does not select the finserve pods")
            if "minAvailable" in d["spec"] or d["spec"].get("maxUnavailable") != 1:
                problems.append(f"{name_of(d)}: use maxUnavailable: 1 (minAvailable blocks every "
                                f"drain of a single replica), got {d['spec']}")
        if kind == "NetworkPolicy":
            problems += networkpolicy_checks(d, selects)
        if kind == "ConfigMap" and d["metadata"]["name"].startswith("finserve-config"):
            dev = d.get("data", {}).get("FINSERVE_DEVICE")
            if dev != ("cuda" if gpu else "cpu"):
                problems.append(f"{name_of(d)}: FINSERVE_DEVICE={dev}")
    return problems


def batch_checks(docs, image):
    """deploy/k8s/batch: one Indexed Job whose pods each score their shard, resumably."""
    jobs = [d for d in docs if d.get("kind") == "Job"]
    others = sorted(d.get("kind") for d in docs if d.get("kind") not in ("Job", "ConfigMap"))
    problems = [f"unexpected kinds {others}"] if others else []
    if len(jobs) != 1:
        return problems + [f"expected exactly one Job, found {len(jobs)}"]
    job = jobs[0]
    spec = job["spec"]
    if spec.get("completionMode") != "Indexed":
        problems.append("completionMode is not Indexed")
    n = spec.get("completions")
    pod = spec["template"]["spec"]
    c = pod["containers"][0]
    args = c.get("args", [])
    index = "$(JOB_COMPLETION_INDEX)"
    if args[:1] != ["predict"]:
        problems.append(f"args do not run `predict`: {args}")
    if f"--shard={index}/{n}" not in args:
        problems.append(f"no --shard={index}/{n} (the N of --shard must equal completions {n})")
    if "--resume" not in args:
        problems.append("no --resume: a restarted pod would start its shard again")
    for flag in ("--out=", "--errors="):
        given = [a for a in args if a.startswith(flag)]
        if not given or index not in given[0]:
            problems.append(f"{flag[:-1]} is not per index: {given}")
    env = {e["name"]: e for e in c.get("env", [])}
    path = env.get(index[2:-1], {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", "")
    if "batch.kubernetes.io/job-completion-index" not in path:
        problems.append("JOB_COMPLETION_INDEX is not declared from the completion-index annotation")
    if pod.get("restartPolicy") != "OnFailure":
        problems.append("restartPolicy is not OnFailure (a failed pod would lose its resumable place)")
    if not pod.get("securityContext", {}).get("runAsNonRoot"):
        problems.append("pod does not run as non-root")
    if not c.get("securityContext", {}).get("readOnlyRootFilesystem"):
        problems.append("root filesystem is writable")
    if image and c.get("image") != image:
        problems.append(f"image {c.get('image')}, expected {image}")
    return [f"{name_of(job)}: {p}" for p in problems]


def parser():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", nargs="?")
    ap.add_argument("--k8s-version", action="append", default=None,
                    help="Kubernetes version(s) to validate against (default: 1.29.0 and the newest bundled)")
    ap.add_argument("--components", default="",
                    help=f"comma-separated components in this combination: {', '.join(sorted(COMPONENTS))}")
    ap.add_argument("--gpu", action="store_true", help="the GPU overlay is in this combination")
    ap.add_argument("--batch", action="store_true", help="deploy/k8s/batch: the Indexed Job")
    ap.add_argument("--image", help="the image the finserve container must have")
    ap.add_argument("--adapter-values", help="prometheus-adapter Helm values with the rules")
    ap.add_argument("--label", help="name of the combination in messages (default: the file)")
    ap.add_argument("--jobs", help="validate many files in one run (schemas load once): one job per "
                    "line, the options and FILE of a single run, shell-quoted")
    return ap


def run_one(args, versions):
    components = {c for c in args.components.split(",") if c}
    unknown = components - COMPONENTS
    if unknown:
        raise SystemExit(f"unknown components {sorted(unknown)}")
    adapter_rules = None
    if args.adapter_values:
        with open(args.adapter_values, encoding="utf-8") as f:
            adapter_rules = yaml.safe_load(f)
    label = args.label or args.file
    docs = load_docs(args.file)
    problems = []
    counts = {"k8s": 0, "crd": 0}
    for doc in docs:
        errs, which = schema_problems(doc, versions)
        problems += errs
        counts[which] += 1
    if args.batch:
        problems += batch_checks(docs, args.image)
    else:
        problems += cross_checks(docs, components, args.gpu, args.image, versions, adapter_rules)
    if problems:
        for p in problems:
            print(f"FAIL {label}: {p}", file=sys.stderr)
        return False
    kinds = ", ".join(sorted(d["kind"] for d in docs))
    print(f"ok: {label}: {counts['k8s']} objects valid against Kubernetes {', '.join(versions)} "
          f"(strict), {counts['crd']} against CRD schemas; finserve checks passed [{kinds}]")
    return True


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    versions = args.k8s_version or ["1.29.0", kubernetes_validate.latest_version()]
    if not args.jobs:
        if not args.file:
            ap.error("FILE or --jobs is required")
        return 0 if run_one(args, versions) else 1
    ok, n = True, 0
    with open(args.jobs, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            job = parser().parse_args(shlex.split(line))
            if not job.file:
                ap.error(f"job without FILE: {line.strip()}")
            ok = run_one(job, job.k8s_version or versions) and ok
            n += 1
    print(f"{n} combination(s) validated{'' if ok else ', some FAILED'}")
    return 0 if ok and n else 1


if __name__ == "__main__":
    sys.exit(main())
