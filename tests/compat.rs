//! The routes other servers' clients speak, against finserve's own answers for the same texts:
//! TEI's `/predict`, vLLM's `/classify` and `/score`, SageMaker's `/ping` and `/invocations`,
//! OpenAI's `guided_choice` / `structured_outputs`, chat content parts, TGI's `POST /` and its
//! no-op parameters. Request and response shapes follow each peer's documented examples.

mod common;

use common::{label_scores, start};
use serde_json::{Value, json};

const TEXTS: [&str; 2] = [
    "Operating profit rose to EUR 13.1 mn .",
    "Net sales fell 10 % .",
];

/// `/v1/sentiment`'s `(label, score)` pairs for `text` with `parameters`.
fn sentiment(s: &common::Server, text: &str, parameters: Value) -> Vec<(String, f64)> {
    let (status, v) = s.post(
        "/v1/sentiment",
        &json!({"inputs": text, "parameters": parameters}),
    );
    assert_eq!(status, 200, "{v}");
    label_scores(&v[0])
}

fn by_label(scores: &[(String, f64)], label: &str) -> f64 {
    scores.iter().find(|(l, _)| l == label).unwrap().1
}

/// Scores of inputs batched together against each alone: equal to 1e-6 (batch shapes move the
/// last bits of the CPU kernels).
fn close(got: f64, want: f64) {
    assert!((got - want).abs() < 1e-6, "{got} vs {want}");
}

#[test]
fn predict_classify_and_score_answer_as_the_sentiment_route() {
    let s = start(&["--served-model-name", "fin"]);
    let (_, info) = s.get("/info");
    let labels: Vec<String> = serde_json::from_str::<Value>(&info).unwrap()["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .collect();
    let expected: Vec<Vec<(String, f64)>> =
        TEXTS.iter().map(|t| sentiment(&s, t, json!({}))).collect();

    // TEI: one input gives one list, a list of inputs a list of lists; raw_scores are the
    // log-likelihoods (function_to_apply: none).
    let (status, one) = s.post("/predict", &json!({"inputs": TEXTS[0]}));
    assert_eq!(status, 200, "{one}");
    assert_eq!(label_scores(&one), expected[0]);
    let (_, many) = s.post("/predict", &json!({"inputs": TEXTS}));
    for (i, e) in expected.iter().enumerate() {
        let got = label_scores(&many[i]);
        assert_eq!(got.len(), e.len());
        for (label, score) in e {
            close(by_label(&got, label), *score);
        }
    }
    let (_, raw) = s.post("/predict", &json!({"inputs": TEXTS[1], "raw_scores": true}));
    let none = sentiment(&s, TEXTS[1], json!({"function_to_apply": "none"}));
    assert_eq!(label_scores(&raw), none);

    // vLLM /classify: probs in the label order of /info, label the most probable.
    let (status, c) = s.post("/classify", &json!({"model": "fin", "input": TEXTS}));
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["object"], "list");
    assert_eq!(c["model"], "fin");
    for (i, e) in expected.iter().enumerate() {
        let d = &c["data"][i];
        assert_eq!(d["index"], i);
        assert_eq!(d["num_classes"], labels.len());
        let probs: Vec<f64> = d["probs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_f64().unwrap())
            .collect();
        for (p, l) in probs.iter().zip(&labels) {
            close(*p, by_label(e, l));
        }
        assert_eq!(d["label"], e[0].0);
    }
    assert!(c["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    let (status, _) = s.post("/classify", &json!({"model": "nope", "input": "x"}));
    assert_eq!(status, 404);

    // vLLM /score as zero-shot classification: one text against labels is the sentiment route
    // with those candidate labels; pairs score each text against its own label among all.
    let candidates = json!(["up", "down", "flat"]);
    let (status, one) = s.post("/score", &json!({"text_1": TEXTS[0], "text_2": candidates}));
    assert_eq!(status, 200, "{one}");
    let want = sentiment(&s, TEXTS[0], json!({"candidate_labels": candidates}));
    for (i, l) in ["up", "down", "flat"].iter().enumerate() {
        assert_eq!(one["data"][i]["index"], i);
        assert_eq!(one["data"][i]["object"], "score");
        assert_eq!(
            one["data"][i]["score"].as_f64().unwrap(),
            by_label(&want, l)
        );
    }
    let (_, pairs) = s.post(
        "/score",
        &json!({"text_1": TEXTS, "text_2": ["up", "down"]}),
    );
    let pair_scores =
        |i: usize| sentiment(&s, TEXTS[i], json!({"candidate_labels": ["up", "down"]}));
    assert_eq!(pairs["data"].as_array().unwrap().len(), 2);
    close(
        pairs["data"][0]["score"].as_f64().unwrap(),
        by_label(&pair_scores(0), "up"),
    );
    close(
        pairs["data"][1]["score"].as_f64().unwrap(),
        by_label(&pair_scores(1), "down"),
    );
    // One label: its probability among it and the served labels (here one of them).
    let (_, single) = s.post("/score", &json!({"text_1": TEXTS[0], "text_2": labels[0]}));
    let own = sentiment(&s, TEXTS[0], json!({"candidate_labels": labels}));
    assert_eq!(
        single["data"][0]["score"].as_f64().unwrap(),
        by_label(&own, &labels[0])
    );
}

#[test]
fn sagemaker_routes_dispatch_on_the_body_shape() {
    let plain = start(&[]);
    assert_eq!(plain.get("/ping").0, 404, "off without --sagemaker");
    assert_eq!(plain.post("/invocations", &json!({"inputs": "x"})).0, 404);
    let s = start(&["--sagemaker", "--served-model-name", "fin"]);
    assert_eq!(s.get("/ping").0, 200);
    let cases = [
        ("/v1/sentiment", json!({"inputs": TEXTS[0]})),
        (
            "/v1/generate",
            json!({"inputs": TEXTS[0], "parameters": {"max_new_tokens": 4}}),
        ),
        ("/classify", json!({"input": TEXTS[0]})),
        (
            "/score",
            json!({"text_1": TEXTS[0], "text_2": ["up", "down"]}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "fin", "messages": [{"role": "user", "content": TEXTS[0]}], "max_tokens": 3, "temperature": 0}),
        ),
        (
            "/v1/completions",
            json!({"model": "fin", "prompt": TEXTS[0], "max_tokens": 3, "temperature": 0}),
        ),
    ];
    // Ids and timestamps differ between two answers; everything else is the same.
    let strip = |mut v: Value| {
        if let Some(o) = v.as_object_mut() {
            o.remove("id");
            o.remove("created");
        }
        v
    };
    for (route, body) in cases {
        let (status, direct) = s.post(route, &body);
        assert_eq!(status, 200, "{route}: {direct}");
        let (status, via) = s.post("/invocations", &body);
        assert_eq!(status, 200, "{route} via /invocations: {via}");
        assert_eq!(strip(via), strip(direct), "{route}");
    }
    let (status, v) = s.post("/invocations", &json!({"text": "x"}));
    assert_eq!(status, 422, "{v}");
}

#[test]
fn guided_choice_picks_the_most_probable_choice_by_exact_scoring() {
    let s = start(&["--served-model-name", "fin"]);
    let choices = json!(["positive", "negative", "neutral"]);
    // The prompt as the model reads it when generating: the text alone, no sentiment template.
    let scores = sentiment(
        &s,
        TEXTS[0],
        json!({"candidate_labels": choices, "prompt_template": "{text}"}),
    );
    let (best, p) = scores[0].clone();
    let (status, c) = s.post(
        "/v1/completions",
        &json!({"model": "fin", "prompt": TEXTS[0], "guided_choice": choices, "logprobs": 0}),
    );
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["choices"][0]["text"], best);
    assert_eq!(c["choices"][0]["finish_reason"], "stop");
    let lp = c["choices"][0]["logprobs"]["token_logprobs"][0]
        .as_f64()
        .unwrap();
    assert!((lp - p.ln()).abs() < 1e-12, "{lp} vs ln {p}");
    let (status, chat) = s.post(
        "/v1/chat/completions",
        &json!({"model": "fin", "messages": [{"role": "user", "content": [{"type": "text", "text": TEXTS[0]}]}],
                "structured_outputs": {"choice": choices}, "logprobs": true}),
    );
    assert_eq!(status, 200, "{chat}");
    assert_eq!(chat["choices"][0]["message"]["content"], best);
    assert!(
        chat["system_fingerprint"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    // Streamed: the same choice in one chunk, then the finish, then [DONE].
    let (status, text) = s.post_raw(
        "/v1/chat/completions",
        &json!({"model": "fin", "messages": [{"role": "user", "content": TEXTS[0]}],
                "guided_choice": choices, "stream": true})
        .to_string(),
        &[],
    );
    assert_eq!(status, 200);
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"));
    let first: Value = serde_json::from_str(data[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["content"], best);
    // Both spellings at once, a repeated choice, or bad sampling fields are refused.
    for body in [
        json!({"model": "fin", "prompt": "x", "guided_choice": ["a", "b"], "structured_outputs": {"choice": ["a", "b"]}}),
        json!({"model": "fin", "prompt": "x", "guided_choice": ["a", "a"]}),
        json!({"model": "fin", "prompt": "x", "guided_choice": ["a", "b"], "temperature": -1}),
    ] {
        let (status, v) = s.post("/v1/completions", &body);
        assert_eq!(status, 422, "{body}: {v}");
    }
}

#[test]
fn chat_content_parts_and_tgi_no_op_parameters_are_accepted() {
    let s = start(&["--served-model-name", "fin"]);
    let chat = |content: Value| {
        let (status, v) = s.post(
            "/v1/chat/completions",
            &json!({"model": "fin", "messages": [{"role": "user", "content": content}],
                    "max_tokens": 4, "temperature": 0}),
        );
        assert_eq!(status, 200, "{v}");
        v["choices"][0]["message"]["content"].clone()
    };
    assert_eq!(
        chat(json!([{"type": "text", "text": TEXTS[0]}])),
        chat(json!(TEXTS[0]))
    );
    let (status, v) = s.post(
        "/v1/chat/completions",
        &json!({"model": "fin", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
    );
    assert_eq!(status, 422);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("only text parts"),
        "{v}"
    );
    // TGI's client sends these on every call.
    let tgi = json!({"inputs": TEXTS[0], "parameters": {"max_new_tokens": 3, "watermark": false,
                     "details": true, "stop": [], "decoder_input_details": false}});
    let (status, list) = s.post("/", &tgi);
    assert_eq!(status, 200, "{list}");
    let (_, direct) = s.post("/generate", &tgi);
    assert_eq!(
        list,
        json!([direct]),
        "POST / answers a list of one generation"
    );
    let (_, v1) = s.post("/v1/generate", &tgi);
    assert_eq!(v1, direct);
    let mut marked = tgi.clone();
    marked["parameters"]["watermark"] = json!(true);
    let (status, v) = s.post("/generate", &marked);
    assert_eq!(status, 422);
    assert!(v["error"].as_str().unwrap().contains("watermark"), "{v}");
    let (status, v) = s.post(
        "/v1/completions",
        &json!({"model": "fin", "prompt": "x", "frequency_penalty": 0.5}),
    );
    assert_eq!(status, 422, "{v}");
}
