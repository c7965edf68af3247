//! The startup fault matrix: finserve started on broken model, tokenizer and adapter files (and a
//! busy port) must exit non-zero within seconds with one error message that names the file and,
//! where there is one, the tensor or field — never a panic, never a server that starts anyway.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A copy of the fixture base model (and the `qv` adapter) that a case may break.
struct Copy {
    _dir: tempfile::TempDir,
    model: PathBuf,
    adapter: PathBuf,
}

fn copy_fixture() -> Copy {
    let dir = tempfile::tempdir().unwrap();
    let (model, adapter) = (dir.path().join("model"), dir.path().join("adapter"));
    for (from, to) in [("mt5_base", &model), ("adapters/qv", &adapter)] {
        std::fs::create_dir(to).unwrap();
        for entry in std::fs::read_dir(common::fixtures().join(from)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
    Copy {
        _dir: dir,
        model,
        adapter,
    }
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

fn truncate(path: &Path, keep: f64) {
    let bytes = std::fs::read(path).unwrap();
    std::fs::write(path, &bytes[..(bytes.len() as f64 * keep) as usize]).unwrap();
}

/// Runs `finserve serve` on the copy (with its adapter unless `adapter` is false) plus `extra`
/// arguments; returns the exit success, stderr and how long it took.
fn start(c: &Copy, adapter: bool, extra: &[&str]) -> (bool, String, Duration) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_finserve"));
    cmd.args(["serve", "--host", "127.0.0.1", "--model"])
        .arg(&c.model)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("FINSERVE_ADAPTER")
        .env_remove("FINSERVE_PORT")
        .env_remove("RUST_BACKTRACE");
    if adapter {
        cmd.arg("--adapter").arg(&c.adapter);
    }
    if !extra.contains(&"--port") {
        cmd.args(["--port", "0"]);
    }
    cmd.args(extra);
    let started = Instant::now();
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A server that starts despite the fault would run forever: stop it after a while.
    let deadline = started + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

#[test]
fn broken_inputs_are_refused_with_a_message_naming_the_file() {
    type Break = Box<dyn Fn(&Copy)>;
    let weights = |c: &Copy| c.model.join("model.safetensors");
    let config = |c: &Copy| c.model.join("config.json");
    let adapter_weights = |c: &Copy| c.adapter.join("adapter_model.safetensors");
    let adapter_config = |c: &Copy| c.adapter.join("adapter_config.json");
    const Q_A: &str = "base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight";
    let cases: Vec<(&str, Break, Vec<&str>)> = vec![
        (
            "truncated weights",
            Box::new(move |c| truncate(&weights(c), 0.5)),
            vec!["model.safetensors"],
        ),
        (
            "empty weights",
            Box::new(move |c| truncate(&weights(c), 0.0)),
            vec!["model.safetensors"],
        ),
        (
            "weights that are not safetensors",
            Box::new(move |c| std::fs::write(weights(c), "this is not a checkpoint\n").unwrap()),
            vec!["model.safetensors"],
        ),
        (
            "unreadable weights",
            Box::new(move |c| {
                std::fs::remove_file(weights(c)).unwrap();
                std::fs::create_dir(weights(c)).unwrap();
            }),
            vec!["model.safetensors"],
        ),
        (
            "garbage config",
            Box::new(move |c| std::fs::write(config(c), "{\"d_model\": 32,").unwrap()),
            vec!["config.json"],
        ),
        (
            "zero dimension",
            Box::new(move |c| edit_json(&config(c), |v| v["d_model"] = 0.into())),
            vec!["config.json", "d_model"],
        ),
        (
            "missing dimension",
            Box::new(move |c| {
                edit_json(&config(c), |v| {
                    v.as_object_mut().unwrap().remove("num_heads");
                })
            }),
            vec!["config.json", "num_heads"],
        ),
        (
            "empty eos_token_id",
            Box::new(move |c| edit_json(&config(c), |v| v["eos_token_id"] = serde_json::json!([]))),
            vec!["config.json", "eos_token_id"],
        ),
        (
            "eos_token_id outside the vocabulary",
            Box::new(move |c| edit_json(&config(c), |v| v["eos_token_id"] = 100_000.into())),
            vec!["config.json", "eos_token_id"],
        ),
        (
            "dimension contradicting the weights",
            Box::new(move |c| edit_json(&config(c), |v| v["d_model"] = 64.into())),
            // The first tensor read is `lm_head` (see `T5Model::load`).
            vec![
                "model.safetensors",
                "lm_head.weight",
                "the config implies [256, 64]",
            ],
        ),
        (
            "vocabulary smaller than the tokenizer's",
            Box::new(move |c| {
                edit_json(&config(c), |v| v["vocab_size"] = 100.into());
            }),
            vec!["vocab_size"],
        ),
        (
            "missing tokenizer",
            Box::new(|c| std::fs::remove_file(c.model.join("tokenizer.json")).unwrap()),
            vec!["tokenizer.json"],
        ),
        (
            "garbage tokenizer",
            Box::new(|c| std::fs::write(c.model.join("tokenizer.json"), "[1, 2]").unwrap()),
            vec!["tokenizer.json"],
        ),
        (
            "adapter rank contradicting its tensors",
            Box::new(move |c| edit_json(&adapter_config(c), |v| v["r"] = 8.into())),
            vec!["adapter_model.safetensors", "r=8"],
        ),
        (
            "adapter with an unknown key",
            Box::new(move |c| {
                let mut t =
                    candle_core::safetensors::load(adapter_weights(c), &candle_core::Device::Cpu)
                        .unwrap();
                let a = t[Q_A].clone();
                t.insert(
                    "base_model.model.encoder.block.0.layer.0.SelfAttention.nonsense.weight".into(),
                    a,
                );
                candle_core::safetensors::save(&t, adapter_weights(c)).unwrap();
            }),
            vec!["adapter_model.safetensors", "nonsense"],
        ),
        (
            "adapter with a wrong shape",
            Box::new(move |c| {
                let mut t =
                    candle_core::safetensors::load(adapter_weights(c), &candle_core::Device::Cpu)
                        .unwrap();
                let a = t[Q_A].narrow(1, 0, 5).unwrap().contiguous().unwrap();
                t.insert(Q_A.into(), a);
                candle_core::safetensors::save(&t, adapter_weights(c)).unwrap();
            }),
            vec!["adapter_model.safetensors", "SelfAttention.q"],
        ),
        (
            "truncated adapter",
            Box::new(move |c| truncate(&adapter_weights(c), 0.6)),
            vec!["adapter_model.safetensors"],
        ),
        (
            "garbage adapter config",
            Box::new(move |c| std::fs::write(adapter_config(c), "peft_type = LORA").unwrap()),
            vec!["adapter_config.json"],
        ),
        (
            "model directory that is a file",
            Box::new(|c| {
                std::fs::remove_dir_all(&c.model).unwrap();
                std::fs::write(&c.model, "not a directory").unwrap();
            }),
            vec!["model"],
        ),
    ];
    let mut failures = Vec::new();
    for (what, break_it, needles) in cases {
        let c = copy_fixture();
        break_it(&c);
        let (ok, stderr, took) = start(&c, true, &[]);
        let error = stderr
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or("");
        let problems = [
            (ok, "exited 0"),
            (took > Duration::from_secs(20), "took too long"),
            (stderr.contains("panicked"), "panicked"),
            (error.is_empty(), "no `error:` line"),
            (
                !needles.iter().all(|n| error.contains(n)),
                "message lacks a needle",
            ),
        ];
        for (bad, why) in problems {
            if bad {
                failures.push(format!("{what}: {why} {needles:?}\n{stderr}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn a_port_in_use_is_refused_by_name() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let c = copy_fixture();
    let (ok, stderr, took) = start(&c, false, &["--port", &port]);
    assert!(
        !ok && took < Duration::from_secs(20) && !stderr.contains("panicked"),
        "{stderr}"
    );
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or("");
    assert!(
        error.contains(&format!("127.0.0.1:{port}")) && error.contains("in use"),
        "{stderr}"
    );
}

/// Values that used to be raised silently (to 1, or 2 candidate labels) or that would make a
/// long input's windows never advance are refused at start-up, naming the flag.
#[test]
fn out_of_range_limits_are_refused_naming_the_flag() {
    let cases: [(&[&str], &str); 12] = [
        (&["--max-candidate-labels", "1"], "--max-candidate-labels"),
        (&["--max-new-tokens", "0"], "--max-new-tokens"),
        (&["--max-stop-length", "0"], "--max-stop-length"),
        (&["--max-client-batch-size", "0"], "--max-client-batch-size"),
        (&["--max-label-length", "0"], "--max-label-length"),
        (&["--max-chunks-per-input", "0"], "--max-chunks-per-input"),
        (
            &["--max-concurrent-requests", "0"],
            "--max-concurrent-requests",
        ),
        (&["--request-timeout-ms", "0"], "--request-timeout-ms"),
        (&["--max-failed-batches", "0"], "--max-failed-batches"),
        (&["--max-input-tokens", "1"], "--max-input-tokens"),
        (&["--max-batch-size", "0"], "--max-batch-size"),
        (
            &["--max-input-tokens", "64", "--chunk-overlap", "64"],
            "--chunk-overlap",
        ),
    ];
    for (args, flag) in cases {
        let mut child = Command::new(env!("CARGO_BIN_EXE_finserve"))
            .args(["serve", "--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .env_remove("FINSERVE_MODEL")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A value wrongly accepted would start a server: give it 20 s, then fail.
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{args:?} was accepted: the server started");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
