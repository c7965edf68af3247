//! OpenTelemetry export: finserve started with `--otlp-endpoint` pointing at a local OTLP/HTTP
//! receiver (a plain TCP server here, decoding the protobuf with `opentelemetry-proto`) sends a
//! request's span, carrying its request id, with `tokenize`, `queue` and `inference` children
//! (and `response` for the answers built in the handler), streamed or not.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::json;

/// Accepts OTLP/HTTP exports and keeps every span received.
fn receiver() -> (String, Arc<Mutex<Vec<Span>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let spans = Arc::new(Mutex::new(Vec::new()));
    let sink = spans.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let mut reader = BufReader::new(stream);
            loop {
                let mut length = 0;
                let mut line = String::new();
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                    break;
                }
                loop {
                    line.clear();
                    reader.read_line(&mut line).unwrap();
                    if line == "\r\n" || line.is_empty() {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                assert!(
                    request_line.starts_with("POST /v1/traces"),
                    "{request_line}"
                );
                let export = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
                for r in export.resource_spans {
                    for s in r.scope_spans {
                        sink.lock().unwrap().extend(s.spans);
                    }
                }
                let reply = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                reader.get_mut().write_all(reply.as_bytes()).unwrap();
            }
        }
    });
    (url, spans)
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            AnyValue::StringValue(s) => s.clone(),
            other => format!("{other:?}"),
        })
}

#[test]
fn a_request_arrives_as_a_span_tree_at_the_otlp_receiver() {
    let (url, spans) = receiver();
    let mut s = common::start(&["--otlp-endpoint", &url, "--served-model-name", "tests"]);
    let requests = [
        (
            "sentiment",
            "/v1/sentiment",
            json!({"inputs": "Profit rose ."}),
        ),
        (
            "generate",
            "/v1/generate",
            json!({"inputs": "Profit rose .", "parameters": {"max_new_tokens": 3}}),
        ),
        (
            "stream",
            "/v1/generate",
            json!({"inputs": "Profit rose .", "stream": true, "parameters": {"max_new_tokens": 3}}),
        ),
        (
            "openai",
            "/v1/completions",
            json!({"model": "tests", "prompt": "Profit rose .", "max_tokens": 3}),
        ),
        (
            "openai-stream",
            "/v1/completions",
            json!({"model": "tests", "prompt": "Profit rose .", "max_tokens": 3, "stream": true}),
        ),
    ];
    for (name, path, body) in &requests {
        let id = format!("trace-{name}");
        let (code, text) = s.post_raw(path, &body.to_string(), &[("x-request-id", &id)]);
        assert_eq!(code, 200, "{name}: {text}");
    }
    // SIGTERM flushes the batch exporter on the way out.
    assert!(s.terminate().success());
    let spans = spans.lock().unwrap();
    for (name, path, _) in &requests {
        let id = format!("trace-{name}");
        let request = spans
            .iter()
            .find(|sp| sp.name == "request" && attribute(sp, "request_id").as_deref() == Some(&id))
            .unwrap_or_else(|| {
                panic!(
                    "no request span for {id}: {:?}",
                    spans.iter().map(|s| &s.name).collect::<Vec<_>>()
                )
            });
        let children: Vec<&str> = spans
            .iter()
            .filter(|sp| sp.parent_span_id == request.span_id && sp.trace_id == request.trace_id)
            .map(|sp| sp.name.as_str())
            .collect();
        let built_in_handler = *path != "/v1/completions" && !name.contains("stream");
        let expected: &[&str] = if built_in_handler {
            &["tokenize", "queue", "inference", "response"]
        } else {
            &["tokenize", "queue", "inference"]
        };
        for want in expected {
            assert!(children.contains(want), "{name}: children {children:?}");
        }
        let queue = spans
            .iter()
            .find(|sp| sp.name == "queue" && sp.parent_span_id == request.span_id)
            .unwrap();
        assert!(queue.end_time_unix_nano >= queue.start_time_unix_nano);
        assert!(queue.start_time_unix_nano >= request.start_time_unix_nano);
    }
}

/// A TLS front for the plain receiver at `backend` (host:port): a private CA and a certificate
/// it signs for 127.0.0.1, made by `openssl`; Python's `ssl` terminates TLS and forwards the
/// bytes.
struct TlsFront {
    url: String,
    ca: std::path::PathBuf,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tls_front(backend: &str) -> TlsFront {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str| dir.path().join(name).display().to_string();
    let (ca, ca_key, cert, key) = (
        file("ca.pem"),
        file("ca-key.pem"),
        file("cert.pem"),
        file("key.pem"),
    );
    let openssl = |args: &[&str]| {
        let made = std::process::Command::new(common::which("openssl"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
    };
    let new_key = ["-newkey", "rsa:2048", "-nodes", "-days", "1"];
    openssl(
        &[
            &["req", "-x509"][..],
            &new_key,
            &["-subj", "/CN=finserve test CA"],
        ]
        .concat()
        .into_iter()
        .chain(["-keyout", &ca_key, "-out", &ca])
        .collect::<Vec<_>>(),
    );
    openssl(
        &[&["req", "-x509"][..], &new_key, &["-subj", "/CN=127.0.0.1"]]
            .concat()
            .into_iter()
            .chain([
                "-CA", &ca, "-CAkey", &ca_key, "-keyout", &key, "-out", &cert,
            ])
            .chain(["-addext", "subjectAltName=IP:127.0.0.1"])
            .chain(["-addext", "basicConstraints=critical,CA:FALSE"])
            .collect::<Vec<_>>(),
    );
    let proxy = r#"
import socket, ssl, sys, threading
cert, key, backend = sys.argv[1], sys.argv[2], sys.argv[3].rsplit(":", 1)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen()
print(srv.getsockname()[1], flush=True)
def pump(a, b):
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            b.sendall(data)
    except OSError:
        pass
    finally:
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
def serve(conn):
    try:
        tls = ctx.wrap_socket(conn, server_side=True)
    except (ssl.SSLError, OSError):
        conn.close()
        return
    up = socket.create_connection((backend[0], int(backend[1])))
    threading.Thread(target=pump, args=(up, tls), daemon=True).start()
    pump(tls, up)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"#;
    let mut child = std::process::Command::new(common::which("python3"))
        .arg("-c")
        .arg(proxy)
        .arg(&cert)
        .arg(&key)
        .arg(backend)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut port)
        .unwrap();
    TlsFront {
        url: format!("https://127.0.0.1:{}", port.trim()),
        ca: ca.into(),
        child,
        _dir: dir,
    }
}

/// An `https://` collector signed by a private CA is reached with `--otlp-ca-file`.
#[test]
fn spans_reach_an_https_collector_trusted_through_otlp_ca_file() {
    let (url, spans) = receiver();
    let front = tls_front(url.trim_start_matches("http://"));
    let ca = front.ca.display().to_string();
    let mut s = common::start(&["--otlp-endpoint", &front.url, "--otlp-ca-file", &ca]);
    let (code, text) = s.post_raw(
        "/v1/sentiment",
        &json!({"inputs": "Profit rose ."}).to_string(),
        &[("x-request-id", "trace-over-tls")],
    );
    assert_eq!(code, 200, "{text}");
    assert!(s.terminate().success());
    let spans = spans.lock().unwrap();
    assert!(
        spans.iter().any(|sp| sp.name == "request"
            && attribute(sp, "request_id").as_deref() == Some("trace-over-tls")),
        "no span arrived over TLS: {:?}\n{}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>(),
        s.log_text()
    );
}
