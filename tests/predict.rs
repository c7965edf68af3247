//! `finserve predict` on the fixture model: the same scores as the server for the same texts,
//! CSV and JSON Lines alike; shards that are disjoint and together the whole file; a run killed
//! with SIGKILL and resumed that writes every row exactly once; rows that cannot be scored in the
//! errors file; a file that cannot be parsed stops the run naming the row.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn predict(args: &[&str]) -> Output {
    let f = common::fixtures();
    Command::new(env!("CARGO_BIN_EXE_finserve"))
        .args(["predict", "--model"])
        .arg(f.join("mt5_base"))
        .arg("--adapter")
        .arg(f.join("adapters/qv"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("FINSERVE_MODEL")
        .env_remove("FINSERVE_ADAPTER")
        .output()
        .unwrap()
}

/// `predict` on the fixture model, running in the background (to be killed).
fn spawn_predict(args: &[&str]) -> Child {
    let f = common::fixtures();
    Command::new(env!("CARGO_BIN_EXE_finserve"))
        .args(["predict", "--model"])
        .arg(f.join("mt5_base"))
        .arg("--adapter")
        .arg(f.join("adapters/qv"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "predict failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn texts(n: usize) -> Vec<String> {
    let words = ["profit", "sales", "loss", "orders", "margin", "guidance"];
    let moves = ["rose", "fell", "were flat", "doubled", "halved"];
    (0..n)
        .map(|i| {
            format!(
                "Quarterly {} {} by {} % .",
                words[i % 6],
                moves[i % 5],
                i % 37
            )
        })
        .collect()
}

fn write_csv(path: &Path, rows: &[String]) {
    let mut w = csv::Writer::from_path(path).unwrap();
    w.write_record(["id", "sentence"]).unwrap();
    for (i, t) in rows.iter().enumerate() {
        w.write_record([format!("doc-{i}"), t.clone()]).unwrap();
    }
    w.flush().unwrap();
}

#[test]
fn predict_scores_as_the_server_does_from_csv_and_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let rows = texts(12);
    let csv_in = dir.path().join("in.csv");
    write_csv(&csv_in, &rows);
    let jsonl_in = dir.path().join("in.jsonl");
    let lines: Vec<String> = rows
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"key": i, "body": t}).to_string())
        .collect();
    std::fs::write(&jsonl_in, lines.join("\n") + "\n").unwrap();
    let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    ok(&predict(&[
        "--data",
        csv_in.to_str().unwrap(),
        "--id-column",
        "id",
        "--out",
        a.to_str().unwrap(),
    ]));
    ok(&predict(&[
        "--data",
        jsonl_in.to_str().unwrap(),
        "--text-column",
        "body",
        "--id-column",
        "key",
        "--out",
        b.to_str().unwrap(),
    ]));
    let (a, b) = (records(&a), records(&b));
    assert_eq!(a.len(), rows.len());
    let s = common::start(&[]);
    for (i, text) in rows.iter().enumerate() {
        assert_eq!(a[i]["row"], i);
        assert_eq!(a[i]["id"], format!("doc-{i}"));
        assert_eq!(b[i]["id"], i);
        assert!(a[i]["digest"].as_str().unwrap().starts_with("sha256:"));
        let (status, served) = s.post("/v1/sentiment", &json!({"inputs": text}));
        assert_eq!(status, 200);
        let served = common::label_scores(&served[0]);
        for r in [&a[i], &b[i]] {
            let got = common::label_scores(&r["scores"]);
            assert_eq!(
                got.iter().map(|x| &x.0).collect::<Vec<_>>(),
                served.iter().map(|x| &x.0).collect::<Vec<_>>()
            );
            for ((_, x), (_, y)) in got.iter().zip(&served) {
                assert!((x - y).abs() < 1e-6, "row {i}: {x} vs {y}");
            }
        }
    }
}

#[test]
fn shards_are_disjoint_and_cover_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.csv");
    write_csv(&input, &texts(40));
    let mut seen = BTreeMap::new();
    for i in 0..3 {
        let out = dir.path().join(format!("part-{i}.jsonl"));
        let shard = format!("{i}/3");
        ok(&predict(&[
            "--data",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--shard",
            &shard,
        ]));
        for r in records(&out) {
            let row = r["row"].as_u64().unwrap();
            assert_eq!(row % 3, i, "row {row} in shard {i}");
            assert!(seen.insert(row, i).is_none(), "row {row} twice");
        }
    }
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (0..40).collect::<Vec<_>>()
    );
    let out = predict(&[
        "--data",
        input.to_str().unwrap(),
        "--out",
        "x",
        "--shard",
        "3/3",
    ]);
    assert!(!out.status.success());
}

#[test]
fn a_killed_run_resumes_without_a_duplicate_or_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.csv");
    let n = 5000;
    write_csv(&input, &texts(n));
    let out = dir.path().join("out.jsonl");
    let mut child = spawn_predict(&[
        "--data",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::fs::read_to_string(&out).map_or(0, |t| t.lines().count()) < 200 {
        assert!(Instant::now() < deadline, "predict wrote nothing");
        assert!(
            child.try_wait().unwrap().is_none(),
            "predict ended before it was killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = std::fs::read_to_string(&out).unwrap().lines().count();
    assert!(before < n, "the run finished before the kill");
    ok(&predict(&[
        "--data",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--resume",
    ]));
    let mut rows: Vec<u64> = records(&out)
        .iter()
        .map(|r| r["row"].as_u64().unwrap())
        .collect();
    rows.sort();
    assert_eq!(rows, (0..n as u64).collect::<Vec<_>>());
}

#[test]
fn bad_rows_go_to_the_errors_file_and_a_broken_file_stops_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        [
            json!({"sentence": "Profit rose ."}),
            json!({"sentence": "   "}),
            json!({"other": "no text"}),
            json!({"sentence": 7}),
            json!({"sentence": "Sales fell ."}),
        ]
        .map(|v| v.to_string())
        .join("\n"),
    )
    .unwrap();
    let out = dir.path().join("out.jsonl");
    let errors = dir.path().join("bad.jsonl");
    ok(&predict(&[
        "--data",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--errors",
        errors.to_str().unwrap(),
    ]));
    let scored: Vec<u64> = records(&out)
        .iter()
        .map(|r| r["row"].as_u64().unwrap())
        .collect();
    assert_eq!(scored, [0, 4]);
    let bad = records(&errors);
    assert_eq!(
        bad.iter()
            .map(|r| r["row"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert!(
        bad[0]["error"].as_str().unwrap().contains("non-blank"),
        "{}",
        bad[0]
    );
    assert!(
        bad[1]["error"].as_str().unwrap().contains("no `sentence`"),
        "{}",
        bad[1]
    );

    std::fs::write(&input, "{\"sentence\": \"Profit rose .\"}\n{not json\n").unwrap();
    let run = predict(&[
        "--data",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("line 2 is not JSON"), "{stderr}");
}

#[test]
fn sentences_mode_writes_each_sentence_with_its_span_and_scores() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let text = "Quarterly profit rose by 5 %. Sales fell by 3 % in Q2.";
    std::fs::write(&input, format!("{}\n", json!({"sentence": text}))).unwrap();
    let out = dir.path().join("out.jsonl");
    ok(&predict(&[
        "--long-input",
        "sentences",
        "--data",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    let record = &records(&out)[0];
    let sentences = record["sentences"].as_array().unwrap();
    let spans: Vec<(usize, usize)> = sentences
        .iter()
        .map(|s| {
            (
                s["span"][0].as_u64().unwrap() as usize,
                s["span"][1].as_u64().unwrap() as usize,
            )
        })
        .collect();
    let piece = |(s, e): (usize, usize)| text.chars().skip(s).take(e - s).collect::<String>();
    assert_eq!(
        spans
            .iter()
            .map(|&s| piece(s).trim().to_string())
            .collect::<Vec<_>>(),
        ["Quarterly profit rose by 5 %.", "Sales fell by 3 % in Q2."]
    );
    for s in sentences.iter().chain([record]) {
        let scores = s["scores"].as_array().unwrap();
        assert_eq!(scores.len(), 3, "{s}");
        let sum: f64 = scores.iter().map(|x| x["score"].as_f64().unwrap()).sum();
        assert!((sum - 1.0).abs() < 1e-9, "{s}");
    }
}

/// Runs `script` with the test venv's Python (pyarrow), `args` as `sys.argv[1:]`; its stdout.
fn pyarrow(script: &str, args: &[&Path]) -> String {
    let out = Command::new(common::python())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn parquet_in_and_out_as_pyarrow_writes_and_reads_it_and_a_killed_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.parquet");
    let zstd = dir.path().join("zstd.parquet");
    let n = 3000;
    // pandas' shapes: an int64 id, large strings, a null text, several row groups, Snappy.
    pyarrow(
        &format!(
            r#"
import sys, pyarrow as pa, pyarrow.parquet as pq
words = ["profit", "sales", "loss", "orders", "margin", "guidance"]
moves = ["rose", "fell", "were flat", "doubled", "halved"]
texts = [f"Quarterly {{words[i % 6]}} {{moves[i % 5]}} by {{i % 37}} % ." for i in range({n})]
texts[5] = None
table = pa.table({{"doc_id": pa.array([1000 + i for i in range({n})], pa.int64()),
                   "sentence": pa.array(texts, pa.large_string()),
                   "other": pa.array([i * 0.5 for i in range({n})])}})
pq.write_table(table, sys.argv[1], row_group_size=500, compression="snappy")
pq.write_table(table, sys.argv[2], compression="zstd")
"#
        ),
        &[&input, &zstd],
    );
    let out = dir.path().join("out.parquet");
    let errors = dir.path().join("errors.jsonl");
    let run = [
        "--data",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--errors",
        errors.to_str().unwrap(),
        "--id-column",
        "doc_id",
        "--part-rows",
        "100",
    ];
    let mut child = spawn_predict(&run);
    let parts = || {
        std::fs::read_dir(&out).map_or(0, |d| {
            d.filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                let name = name.to_str().unwrap();
                name.starts_with("part-") && name.ends_with(".parquet")
            })
            .count()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while parts() < 3 {
        assert!(Instant::now() < deadline, "predict wrote no parts");
        assert!(
            child.try_wait().unwrap().is_none(),
            "predict ended before it was killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(parts() < n / 100, "the run finished before the kill");
    // Without --resume, a directory with parts is refused rather than mixed into.
    let again = predict(&[
        "--data",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));
    ok(&predict(&[&run[..], &["--resume"]].concat()));
    // pyarrow reads the directory as one table.
    let table = pyarrow(
        r#"
import sys, json, pyarrow.parquet as pq
t = pq.read_table(sys.argv[1])
print(json.dumps(t.schema.names))
for r in t.to_pylist():
    print(json.dumps(r))
"#,
        &[&out],
    );
    let mut lines = table.lines();
    let names: Vec<String> = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(
        names,
        [
            "row",
            "id",
            "label",
            "score_negative",
            "score_neutral",
            "score_positive",
            "digest"
        ]
    );
    let rows: Vec<Value> = lines.map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut seen: Vec<u64> = rows.iter().map(|r| r["row"].as_u64().unwrap()).collect();
    seen.sort();
    let want: Vec<u64> = (0..n as u64).filter(|&r| r != 5).collect();
    assert_eq!(seen, want, "a row missing or written twice");
    // The same scores as JSON Lines output from the same file.
    let jsonl = dir.path().join("out.jsonl");
    ok(&predict(&[
        "--data",
        input.to_str().unwrap(),
        "--out",
        jsonl.to_str().unwrap(),
        "--id-column",
        "doc_id",
    ]));
    let by_row: BTreeMap<u64, Value> = records(&jsonl)
        .into_iter()
        .map(|r| (r["row"].as_u64().unwrap(), r))
        .collect();
    for r in &rows {
        let row = r["row"].as_u64().unwrap();
        let j = &by_row[&row];
        assert_eq!(r["id"], (1000 + row).to_string(), "{r}");
        assert_eq!(j["id"], 1000 + row);
        assert_eq!(r["label"], j["scores"][0]["label"]);
        for s in j["scores"].as_array().unwrap() {
            let column = format!("score_{}", s["label"].as_str().unwrap());
            assert_eq!(r[&column], s["score"], "row {row} {column}");
        }
        assert_eq!(r["digest"], j["digest"]);
    }
    let bad = records(&errors);
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0]["row"], 5);
    assert!(
        bad[0]["error"].as_str().unwrap().contains("null"),
        "{}",
        bad[0]
    );
    // A codec that is not built in stops the run, naming it.
    let refused = predict(&[
        "--data",
        zstd.to_str().unwrap(),
        "--out",
        "/tmp/never.jsonl",
    ]);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr).to_lowercase();
    assert!(why.contains("zstd"), "{why}");
}

/// Entity-level targets per row, as `parameters.targets` takes them: the demo model's scores for
/// each equal the server's, beside the text's own; a row with a bad target goes to the errors.
#[test]
fn a_targets_column_scores_each_target_as_the_server_does() {
    let dir = tempfile::tempdir().unwrap();
    let text =
        "Siemens is rallying 6% after a boom in orders, while Huhtamaki fell 3% on weak demand.";
    let targets = json!(["Siemens", {"start": 53, "end": 62}]);
    let jsonl = dir.path().join("in.jsonl");
    let lines = [
        json!({"sentence": text, "entities": targets}),
        json!({"sentence": text, "entities": ["Nokia"]}),
        json!({"sentence": text, "entities": "Siemens"}),
    ];
    std::fs::write(&jsonl, lines.map(|l| l.to_string()).join("\n") + "\n").unwrap();
    let csv_in = dir.path().join("in.csv");
    let mut w = csv::Writer::from_path(&csv_in).unwrap();
    w.write_record(["sentence", "entities"]).unwrap();
    w.write_record([text, &targets.to_string()]).unwrap();
    w.flush().unwrap();
    let run = |input: &Path, out: &Path| {
        let output = Command::new(env!("CARGO_BIN_EXE_finserve"))
            .current_dir(common::repo())
            .args(["predict", "--targets-column", "entities", "--data"])
            .arg(input)
            .arg("--out")
            .arg(out)
            .env("HF_HUB_OFFLINE", "1")
            .env_remove("FINSERVE_MODEL")
            .env_remove("FINSERVE_ADAPTER")
            .output()
            .unwrap();
        ok(&output);
        records(out)
    };
    let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    let from_jsonl = run(&jsonl, &a);
    let from_csv = run(&csv_in, &b);
    assert_eq!(from_jsonl.len(), 1);
    let mut errors = dir.path().join("a.jsonl").into_os_string();
    errors.push(".errors");
    let bad = records(Path::new(&errors));
    assert_eq!(bad.len(), 2, "{bad:?}");
    assert!(
        bad[0]["error"].as_str().unwrap().contains("Nokia"),
        "{}",
        bad[0]
    );
    assert!(
        bad[1]["error"].as_str().unwrap().contains("list"),
        "{}",
        bad[1]
    );
    // The demo model, as `predict` served it: the default when no --model is given.
    let s = common::start_with(
        &["serve", "--host", "127.0.0.1", "--port", "0"].map(String::from),
        &[],
    );
    let (status, served) = s.post(
        "/v1/sentiment",
        &json!({"inputs": text, "parameters": {"targets": targets}}),
    );
    assert_eq!(status, 200, "{served}");
    let (_, whole) = s.post("/v1/sentiment", &json!({"inputs": text}));
    for record in [&from_jsonl[0], &from_csv[0]] {
        let got = record["targets"].as_array().unwrap();
        let want = served[0].as_array().unwrap();
        assert_eq!(got.len(), 2);
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g["target"], w["target"]);
            assert_eq!(g["spans"], w["spans"]);
            let (g, w) = (
                common::label_scores(&g["scores"]),
                common::label_scores(&w["scores"]),
            );
            for ((gl, x), (wl, y)) in g.iter().zip(&w) {
                assert_eq!(gl, wl);
                assert!((x - y).abs() < 1e-6, "{gl}: {x} vs {y}");
            }
        }
        let (g, w) = (
            common::label_scores(&record["scores"]),
            common::label_scores(&whole[0]),
        );
        for ((gl, x), (wl, y)) in g.iter().zip(&w) {
            assert_eq!(gl, wl);
            assert!((x - y).abs() < 1e-6, "text {gl}: {x} vs {y}");
        }
    }
}
