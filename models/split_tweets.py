#!/usr/bin/env python3
"""Fix the held-out split of the finance tweets for the demo model.

    python3 models/split_tweets.py            (standard library only; deterministic)

Input : models/data/twitter_financial_news_sentiment/tfns_train.csv (the Hub's train split, labels already
        mapped to negative / neutral / positive; see PROVENANCE.md there)
Outputs: models/data/tweets_test.csv        15 % of the distinct tweets, stratified by label, seed 20261129
         models/data/tweets_train_pool.csv  every other distinct tweet

Tweets are compared after collapsing whitespace; a text that carries two labels is dropped everywhere and
duplicates are kept once, so no held-out tweet occurs in training.
"""
import csv
import random
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "data" / "twitter_financial_news_sentiment" / "tfns_train.csv"
SEED = 20261129
TEST_FRACTION = 0.15
LABELS = ["negative", "neutral", "positive"]


def main():
    labels = defaultdict(set)
    text_of = {}
    with open(SOURCE, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            key = " ".join(r["sentence"].split())
            labels[key].add(r["label"])
            text_of.setdefault(key, r["sentence"])
    clean = sorted((k, next(iter(v))) for k, v in labels.items() if len(v) == 1)
    dropped = sum(1 for v in labels.values() if len(v) > 1)
    rng = random.Random(SEED)
    test, pool = [], []
    for lab in LABELS:
        group = [k for k, l in clean if l == lab]
        rng.shuffle(group)
        n = round(len(group) * TEST_FRACTION)
        test += [(text_of[k], lab) for k in group[:n]]
        pool += [(text_of[k], lab) for k in group[n:]]
    test.sort()
    pool.sort()
    assert not {t for t, _ in test} & {t for t, _ in pool}
    for name, rows in [("tweets_test.csv", test), ("tweets_train_pool.csv", pool)]:
        with open(HERE / "data" / name, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["sentence", "label"])
            w.writerows(rows)

    def dist(rows):
        return {l: sum(1 for r in rows if r[1] == l) for l in LABELS}
    print(f"distinct tweets: {len(labels)}, conflicting (dropped): {dropped}")
    print(f"test: {len(test)} {dist(test)}")
    print(f"train pool: {len(pool)} {dist(pool)}")


if __name__ == "__main__":
    main()
