//! Starts the real `finserve` binary on an ephemeral port for integration tests, and speaks
//! HTTP to it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Hub settings that never reach the network and find nothing in a cache.
pub fn offline_hub() -> finserve::hub::HubConfig {
    finserve::hub::HubConfig {
        cache_dir: std::env::temp_dir().join("finserve-test-no-cache"),
        endpoint: None,
        token: None,
        offline: true,
    }
}

pub fn fixtures() -> PathBuf {
    repo().join("tests/parity/fixtures")
}

pub struct Server {
    pub child: Child,
    pub url: String,
    pub logs: Arc<Mutex<Vec<String>>>,
}

/// Starts finserve on the tiny fixture model (mt5_base + qv adapter) with extra `args`.
pub fn start(args: &[&str]) -> Server {
    let f = fixtures();
    let mut all: Vec<String> = vec![
        "serve".into(),
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        "0".into(),
        "--model".into(),
        f.join("mt5_base").display().to_string(),
        "--adapter".into(),
        f.join("adapters/qv").display().to_string(),
    ];
    all.extend(args.iter().map(|s| s.to_string()));
    start_with(&all, &[])
}

/// Starts the binary with exactly `args` (and `env`), and waits until it is ready.
pub fn start_with(args: &[String], env: &[(&str, &str)]) -> Server {
    start_in(args, env, &repo())
}

/// [`start_with`] in the working directory `dir` (the repository root serves the demo model).
pub fn start_in(args: &[String], env: &[(&str, &str)], dir: &Path) -> Server {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_finserve"));
    cmd.current_dir(dir)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("FINSERVE_LOG", "info")
        .env_remove("FINSERVE_MODEL")
        .env_remove("FINSERVE_ADAPTER")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("cannot start finserve");
    let stderr = child.stderr.take().expect("stderr");
    let logs = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel();
    let sink = logs.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line.split("address=").nth(1) {
                let addr = addr
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .trim_matches('"')
                    .to_string();
                let _ = tx.send(addr);
            }
            sink.lock().unwrap().push(line);
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("finserve did not start: {:?}", logs.lock().unwrap()));
    let mut server = Server {
        child,
        url: format!("http://{addr}"),
        logs,
    };
    server.wait_ready();
    server
}

impl Server {
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(50));
                panic!(
                    "finserve exited ({status}) before it was ready: {:?}",
                    self.logs.lock().unwrap()
                );
            }
            if let Ok(r) = ureq::get(&format!("{}/ready", self.url)).call()
                && r.status() == 200
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "finserve never became ready: {:?}",
            self.logs.lock().unwrap()
        );
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        response(ureq::get(&format!("{}{path}", self.url)).call())
    }

    pub fn post(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let (status, text) = self.post_raw(path, &body.to_string(), &[]);
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    }

    pub fn post_raw(&self, path: &str, body: &str, headers: &[(&str, &str)]) -> (u16, String) {
        let mut req =
            ureq::post(&format!("{}{path}", self.url)).set("content-type", "application/json");
        for (k, v) in headers {
            req = req.set(k, v);
        }
        response(req.send_string(body))
    }

    pub fn metrics(&self) -> String {
        self.get("/metrics").1
    }

    pub fn log_text(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// The log once it holds `needle`, or as it is after 10 s: a request's line reaches the
    /// reader thread a moment after its response reaches the client.
    pub fn log_text_with(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let logs = self.log_text();
            if logs.contains(needle) || std::time::Instant::now() > deadline {
                return logs;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        self.child.wait().expect("wait")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn response(r: Result<ureq::Response, ureq::Error>) -> (u16, String) {
    match r {
        Ok(resp) => (resp.status(), resp.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, resp)) => (code, resp.into_string().unwrap_or_default()),
        Err(e) => panic!("request failed: {e}"),
    }
}

/// Value of a metric sample line `name{labels} value` whose name and labels contain `needle`.
pub fn metric_value(metrics: &str, name: &str, label: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.starts_with(name) && l.contains(label) && l[name.len()..].starts_with(['{', ' '])
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `(label, score)` pairs of one `/v1/sentiment` input, in response order.
pub fn label_scores(entry: &serde_json::Value) -> Vec<(String, f64)> {
    entry
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["label"].as_str().unwrap().into(),
                s["score"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Same labels in the same order, probabilities equal to 1e-6. Not bitwise: the CPU matmul
/// kernels block differently for different batch shapes, which moves the last bits.
pub fn assert_same_scores(batched: &serde_json::Value, alone: &serde_json::Value, i: usize) {
    let (b, a) = (label_scores(&batched[0]), label_scores(&alone[0]));
    assert_eq!(
        b.iter().map(|x| &x.0).collect::<Vec<_>>(),
        a.iter().map(|x| &x.0).collect::<Vec<_>>(),
        "input {i}"
    );
    for ((_, x), (_, y)) in b.iter().zip(&a) {
        assert!((x - y).abs() < 1e-6, "input {i}: batched {x} vs alone {y}");
    }
}

pub fn python() -> PathBuf {
    let venv = repo().join(".ci/venv/bin/python");
    if let Ok(p) = std::env::var("FINSERVE_TEST_PYTHON") {
        PathBuf::from(p)
    } else {
        assert!(
            venv.is_file(),
            "{} is missing: run .ci/setup (it installs huggingface_hub for the client tests)",
            venv.display()
        );
        venv
    }
}

pub fn which(tool: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| Path::new(p).is_file())
    });
    found.unwrap_or_else(|| panic!("`{tool}` is not installed: run .ci/setup"))
}
