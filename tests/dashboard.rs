//! The Grafana dashboard (deploy/grafana) is valid provisioning JSON and every panel query names a
//! metric that finserve's registry really exports.

use std::collections::BTreeSet;
use std::path::PathBuf;

use finserve::metrics::METRICS;
use serde_json::Value;

fn exported_metric_names() -> BTreeSet<String> {
    // Vectors only show up once they have a child; give each one.
    let m = &*METRICS;
    m.requests
        .with_label_values(&["/v1/sentiment", "200"])
        .inc();
    m.errors.with_label_values(&["validation"]).inc();
    m.cancelled.with_label_values(&["generate"]).inc();
    m.predictions.with_label_values(&["v", "neutral"]).inc();
    m.top_score
        .with_label_values(&["v", "neutral"])
        .observe(0.9);
    m.generated_tokens.with_label_values(&["v"]).inc();
    for h in [
        &m.request_duration,
        &m.tokenization_duration,
        &m.queue_duration,
        &m.inference_duration,
        &m.input_tokens,
    ] {
        h.with_label_values(&["x"]).observe(1.0);
    }
    for h in [&m.batch_size, &m.batch_tokens, &m.forward_duration] {
        h.with_label_values(&["x", "v"]).observe(1.0);
    }
    let text = finserve::metrics::render().expect("metrics render");
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        names.insert(name.to_string());
        if kind == "histogram" || kind == "summary" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
    }
    names
}

fn exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[test]
fn dashboard_queries_name_exported_metrics() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("dashboards/finserve.json")).unwrap(),
    )
    .unwrap();
    assert!(dashboard["title"].is_string() && dashboard["uid"].is_string());
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let mut e = Vec::new();
        exprs(p, &mut e);
        assert!(!e.is_empty(), "panel {} has no query", p["title"]);
    }
    let exported = exported_metric_names();
    let mut queries = Vec::new();
    exprs(&dashboard, &mut queries);
    let metric = regex::Regex::new(r"\b(?:finserve|process)_[a-z_]+").unwrap();
    let mut used = 0;
    for q in &queries {
        for m in metric.find_iter(q) {
            used += 1;
            assert!(
                exported.contains(m.as_str()),
                "query `{q}` uses `{}`, which finserve does not export",
                m.as_str()
            );
        }
    }
    assert!(used >= panels.len(), "queries name too few metrics");
    for f in [
        "provisioning/datasources/prometheus.yml",
        "provisioning/dashboards/finserve.yml",
    ] {
        assert!(root.join(f).is_file(), "{f} missing");
    }
}
