#!/usr/bin/env python3
"""Reference values for finserve's ROUGE-L and BLEU (src/generation_metrics.rs), from the Python packages
that LoRA recipes report them with. Writes tests/generation/fixture.json:

    pip install rouge-score==0.1.2 sacrebleu==2.6.0
    python3 tests/generation/make_fixture.py

Pairs: hand-written edge cases (punctuation, numbers, HTML entities, case, non-ASCII, empty and
very short outputs, repeated words, line breaks), then PhraseBank training-pool sentences
(models/data/train_pool.csv) with seeded word drops, swaps and substitutions as "predictions".
For every pair: ROUGE-L F1 (`RougeScorer(["rougeL"])`, no stemmer); for the whole list and for
groups of 7 consecutive pairs: the mean ROUGE-L F1 and `sacrebleu.corpus_bleu` with its defaults.
"""
import csv
import json
import random
from pathlib import Path

import sacrebleu
from rouge_score import rouge_scorer

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

EDGE = [
    ("Operating profit rose to EUR 13.5 mn .", "Operating profit rose to EUR 13.5 mn ."),
    ("operating profit ROSE to eur 13.5 mn", "Operating profit rose to EUR 13.5 mn ."),
    ("Profit rose 3.5% to EUR 1,200 (est.), 2007-2008.", "Profit rose 3.5 % to EUR 1,200 ( est . ) , 2007 - 2008 ."),
    ("Sales &amp; margins &lt;fell&gt; &quot;sharply&quot;", "Sales & margins <fell> \"sharply\""),
    ("Zürich-based Sika's Q3 net-income: +12 %", "Sika's third-quarter net income rose 12 % in Zürich"),
    ("日本語のニュース", "日本語のニュース"),
    ("", "The company reported a loss ."),
    ("loss", "The company reported a loss ."),
    ("positive", "positive"),
    ("positive", "negative"),
    ("the the the the the", "the cat is on the mat"),
    ("Shares fell\nafter the warning -\nanalysts said.", "Shares fell after the warning , analysts said ."),
    ("Net sales , EUR 5 mn , were flat .", "Net sales were flat at EUR 5 mn ."),
    ("U.S. growth 2.5 pct; Q/Q -0.3", "US growth 2.5 pct , quarter on quarter -0.3"),
]


def perturb(sentence, rng):
    words = sentence.split()
    out = []
    for w in words:
        r = rng.random()
        if r < 0.1:
            continue
        if r < 0.18:
            out.append(rng.choice(["rose", "fell", "EUR", "the", "said", "."]))
            continue
        out.append(w)
    if len(out) > 3 and rng.random() < 0.5:
        i = rng.randrange(len(out) - 1)
        out[i], out[i + 1] = out[i + 1], out[i]
    return " ".join(out)


def main():
    rng = random.Random(20261206)
    with open(REPO / "models" / "data" / "train_pool.csv", newline="", encoding="utf-8") as f:
        sentences = [r["sentence"] for r in csv.DictReader(f)]
    picked = rng.sample(sentences, 42)
    pairs = EDGE + [(perturb(s, rng), s) for s in picked]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rows = [{"prediction": p, "reference": r, "rouge_l": scorer.score(r, p)["rougeL"].fmeasure}
            for p, r in pairs]

    def corpus(part):
        preds = [x["prediction"] for x in part]
        refs = [x["reference"] for x in part]
        return {"rouge_l": sum(x["rouge_l"] for x in part) / len(part),
                "bleu": sacrebleu.corpus_bleu(preds, [refs]).score}

    groups = [{"start": i, "end": min(i + 7, len(rows)), **corpus(rows[i:i + 7])} for i in range(0, len(rows), 7)]
    out = {"rouge_score": "0.1.2", "sacrebleu": sacrebleu.__version__, "pairs": rows,
           "corpus": corpus(rows), "groups": groups}
    (HERE / "fixture.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(rows)} pairs, corpus {out['corpus']}")


if __name__ == "__main__":
    main()
