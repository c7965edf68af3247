#!/usr/bin/env python3
"""Fix the train/test split of Financial PhraseBank for the demo model, by SENTENCE.

    python3 models/split.py            (standard library only; deterministic)

Inputs : models/data/financial_phrasebank/phrasebank_{50,66,75,all}agree.csv (nested agreement levels)
Outputs: models/data/test.csv         held-out test set: 20% of the distinct AllAgree sentences, stratified by label
         models/data/train_pool.csv   every other distinct sentence (any agreement file), with its label and
                                      `agree` = the highest agreement level it appears in (100/75/66/50)

Rules:
  * sentences are compared exactly (the CSVs hold the published, pre-tokenised text);
  * a sentence that carries two different labels anywhere (2 such sentences in 50Agree) is dropped everywhere;
  * duplicates are removed (one row per distinct sentence);
  * no sentence of test.csv occurs in train_pool.csv, whatever agreement file it came from.
"""
import csv
import random
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "financial_phrasebank"
SEED = 20240607
TEST_FRACTION = 0.20
LEVELS = [("allagree", 100), ("75agree", 75), ("66agree", 66), ("50agree", 50)]
LABELS = ["negative", "neutral", "positive"]


def read(level):
    with open(DATA / f"phrasebank_{level}.csv", newline="", encoding="utf-8") as f:
        return [(r["sentence"], r["label"]) for r in csv.DictReader(f)]


def main():
    labels = defaultdict(set)
    agree = {}
    for level, pct in LEVELS:  # highest level first
        for s, l in read(level):
            labels[s].add(l)
            agree.setdefault(s, pct)
    conflicting = sorted(s for s, ls in labels.items() if len(ls) > 1)
    clean = {s: next(iter(ls)) for s, ls in labels.items() if len(ls) == 1}

    allagree = sorted({s for s, _ in read("allagree")} - set(conflicting))
    rng = random.Random(SEED)
    test = []
    for lab in LABELS:
        group = [s for s in allagree if clean[s] == lab]
        rng.shuffle(group)
        n = round(len(group) * TEST_FRACTION)
        test += [(s, lab) for s in group[:n]]
    test.sort()
    test_set = {s for s, _ in test}
    pool = sorted((s, clean[s], agree[s]) for s in clean if s not in test_set)
    assert not test_set & {s for s, _, _ in pool}

    with open(HERE / "data" / "test.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["sentence", "label"])
        w.writerows(test)
    with open(HERE / "data" / "train_pool.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["sentence", "label", "agree"])
        w.writerows(pool)

    def dist(rows):
        return {l: sum(1 for r in rows if r[1] == l) for l in LABELS}
    print(f"distinct sentences: {len(labels)}, conflicting (dropped): {len(conflicting)}")
    print(f"distinct AllAgree: {len(allagree)}; test: {len(test)} ({len(test) / len(allagree):.1%}) {dist(test)}")
    for pct in (100, 75, 66, 50):
        rows = [r for r in pool if r[2] == pct]
        print(f"train pool, highest agreement {pct}: {len(rows)} {dist(rows)}")
    print(f"train pool total: {len(pool)}")


if __name__ == "__main__":
    main()
