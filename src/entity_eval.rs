//! `finserve eval` on entity-level data (FinEntity's JSON Lines): every annotated entity is
//! scored as a target of its text through [`Engine::score`], exactly as a request with
//! `parameters.targets` would be, and compared with two baselines on the same rows: the majority
//! label, and the label the same model gives the whole text, copied to each of its entities.
//! Accuracy, macro-F1 and the accuracy on the entities of texts that mix sentiments get 95 %
//! confidence intervals from a bootstrap over texts (entities of one text are not independent).

use std::io::Write;

use anyhow::Context;
use futures::StreamExt;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::classification::Report;
use crate::engine::Engine;
use crate::engine::infer::{LongInput, ScoreQuery};
use crate::engine::targets::Target;
use crate::entity_data::EntityText;

/// Bootstrap resamples of the confidence intervals.
const RESAMPLES: usize = 2000;

/// One entity's outcome: gold label, the model's prediction, the copied text label.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    gold: usize,
    target: usize,
    copied: usize,
}

/// One way of predicting an entity's label from its outcome.
type Pick<'a> = &'a dyn Fn(&Outcome) -> usize;

/// What is reported for one way of predicting.
struct Metrics {
    accuracy: f64,
    macro_f1: f64,
    mixed_accuracy: f64,
}

fn metrics(
    labels: &[String],
    texts: &[(bool, Vec<Outcome>)],
    pick: &dyn Fn(&Outcome) -> usize,
) -> Metrics {
    let pairs: Vec<(usize, usize)> = texts
        .iter()
        .flat_map(|(_, o)| o.iter().map(|o| (o.gold, pick(o))))
        .collect();
    let report = Report::new(labels.to_vec(), &pairs);
    let mixed: Vec<(usize, usize)> = texts
        .iter()
        .filter(|(m, _)| *m)
        .flat_map(|(_, o)| o.iter().map(|o| (o.gold, pick(o))))
        .collect();
    let right = mixed.iter().filter(|(g, p)| g == p).count();
    Metrics {
        accuracy: report.accuracy(),
        macro_f1: report.macro_f1(),
        mixed_accuracy: right as f64 / mixed.len().max(1) as f64,
    }
}

/// The 2.5th and 97.5th percentiles of each metric over resamples of the texts (mixed and other
/// texts resampled separately, so every resample has as many of each as the data).
fn intervals(labels: &[String], texts: &[(bool, Vec<Outcome>)], pick: Pick) -> [(f64, f64); 3] {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let (mixed, plain): (Vec<_>, Vec<_>) = texts.iter().partition(|(m, _)| *m);
    let mut samples: [Vec<f64>; 3] = Default::default();
    for _ in 0..RESAMPLES {
        let mut draw = Vec::with_capacity(texts.len());
        for group in [&mixed, &plain] {
            for _ in 0..group.len() {
                draw.push((*group[rng.random_range(0..group.len())]).clone());
            }
        }
        let m = metrics(labels, &draw, pick);
        for (s, v) in samples
            .iter_mut()
            .zip([m.accuracy, m.macro_f1, m.mixed_accuracy])
        {
            s.push(v);
        }
    }
    samples.map(|mut s| {
        s.sort_by(f64::total_cmp);
        let at = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
        (at(0.025), at(0.975))
    })
}

fn argmax(probs: &[f64]) -> usize {
    (0..probs.len())
        .max_by(|&a, &b| probs[a].total_cmp(&probs[b]))
        .unwrap_or(0)
}

/// Scores every entity of `texts`, prints the three ways' metrics with their intervals and the
/// model's confusion matrix, and writes one JSON line per entity to `out` if given.
pub fn run(
    engine: &Engine,
    texts: &[EntityText],
    labels: &[String],
    long_input: LongInput,
    out: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let entities: usize = texts.iter().map(|t| t.entities.len()).sum();
    let bar = indicatif::ProgressBar::new(entities as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} entities ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let in_flight = engine.config().max_batch_size;
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let start = std::time::Instant::now();
    let results = rt.block_on(
        futures::stream::iter(texts)
            .map(|t| {
                let targets = t
                    .entities
                    .iter()
                    .map(|(e, _)| Target::Span {
                        start: e.spans[0].0,
                        end: e.spans[0].1,
                    })
                    .collect();
                let query = ScoreQuery {
                    texts: vec![t.text.clone()],
                    long_input,
                    targets: Some(vec![targets]),
                    text_scores_with_targets: true,
                    ..Default::default()
                };
                let bar = bar.clone();
                async move {
                    let scored = engine.score(query, None).await;
                    bar.inc(t.entities.len() as u64);
                    scored
                }
            })
            .buffered(in_flight)
            .collect::<Vec<_>>(),
    );
    bar.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64();
    let mut writer = match out {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => None,
    };
    let mut outcomes: Vec<(bool, Vec<Outcome>)> = Vec::with_capacity(texts.len());
    let mut refused = Vec::new();
    for (i, (t, result)) in texts.iter().zip(results).enumerate() {
        let scored = match result {
            Ok(s) => s,
            Err(e @ crate::error::Error::Invalid { .. }) => {
                refused.push((i + 1, e.to_string()));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let text = scored
            .texts
            .first()
            .context("the engine returned no scores")?;
        let copied = argmax(&text.probs);
        let mut o = Vec::with_capacity(t.entities.len());
        for ((entity, gold), target) in t.entities.iter().zip(&text.targets) {
            let predicted = argmax(&target.scores.probs);
            o.push(Outcome {
                gold: *gold,
                target: predicted,
                copied,
            });
            if let Some(w) = writer.as_mut() {
                let line = serde_json::json!({
                    "line": i + 1,
                    "target": entity.name,
                    "span": entity.spans[0],
                    "label": labels[*gold],
                    "prediction": labels[predicted],
                    "text_prediction": labels[copied],
                    "mixed": t.mixed(),
                    "scores": labels.iter().zip(&target.scores.probs).map(|(n, p)| (n.clone(), serde_json::json!(p))).collect::<serde_json::Map<_, _>>(),
                });
                writeln!(w, "{line}")?;
            }
        }
        outcomes.push((t.mixed(), o));
    }
    let scored: usize = outcomes.iter().map(|(_, o)| o.len()).sum();
    let mixed_texts = outcomes.iter().filter(|(m, _)| *m).count();
    let mixed_entities: usize = outcomes
        .iter()
        .filter(|(m, _)| *m)
        .map(|(_, o)| o.len())
        .sum();
    let mut counts = vec![0usize; labels.len()];
    for (_, o) in &outcomes {
        for e in o {
            counts[e.gold] += 1;
        }
    }
    let majority = argmax(&counts.iter().map(|&c| c as f64).collect::<Vec<_>>());
    println!(
        "{scored} entities of {} texts scored as targets in {elapsed:.1} s ({:.1} targets/s); \
         {mixed_entities} entities in {mixed_texts} texts that mix sentiments\n",
        outcomes.len(),
        scored as f64 / elapsed
    );
    println!(
        "{:<34} {:>22} {:>22} {:>22}",
        "", "accuracy", "macro-F1", "mixed-text accuracy"
    );
    let ways: [(String, Pick); 3] = [
        ("targets (this model)".into(), &|o: &Outcome| o.target),
        ("text label copied (this model)".into(), &|o: &Outcome| {
            o.copied
        }),
        (
            format!("majority label ({})", labels[majority]),
            &|_: &Outcome| majority,
        ),
    ];
    for (name, pick) in &ways {
        let m = metrics(labels, &outcomes, pick);
        let ci = intervals(labels, &outcomes, pick);
        let cell = |v: f64, (lo, hi): (f64, f64)| format!("{v:.4} [{lo:.3}, {hi:.3}]");
        println!(
            "{name:<34} {:>22} {:>22} {:>22}",
            cell(m.accuracy, ci[0]),
            cell(m.macro_f1, ci[1]),
            cell(m.mixed_accuracy, ci[2])
        );
    }
    println!(
        "(95 % intervals: bootstrap over texts, {RESAMPLES} resamples, mixed and other texts drawn separately)\n"
    );
    let pairs: Vec<(usize, usize)> = outcomes
        .iter()
        .flat_map(|(_, o)| o.iter().map(|o| (o.gold, o.target)))
        .collect();
    println!(
        "targets (this model):\n{}",
        Report::new(labels.to_vec(), &pairs).render()
    );
    if !refused.is_empty() {
        println!("{} texts refused and left out above:", refused.len());
        for (line, why) in &refused {
            println!("  line {line}: {why}");
        }
    }
    Ok(())
}
