#!/usr/bin/env python3
"""Fix the held-out split of FinEntity (entity-level sentiment) for the demo model.

    python3 models/split_finentity.py         (standard library only; deterministic)

Input : models/data/finentity/finentity_train.jsonl (the shared training split of FinEntity; see PROVENANCE.md)
Outputs: models/data/finentity_test.jsonl        20 % of the texts: the held-out rows README's scores come from
         models/data/finentity_dev.jsonl         10 %: picks the adapter's epoch, never trained on
         models/data/finentity_train_pool.jsonl  the rest

Split by text (every entity of a text lands on the same side), stratified by whether the text mixes sentiments
(its entities do not all carry one label), seed 20261206.
"""
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "data" / "finentity" / "finentity_train.jsonl"
SEED = 20261206
TEST_FRACTION, DEV_FRACTION = 0.20, 0.10


def mixed(record):
    return len({a["label"] for a in record["annotations"]}) > 1


def main():
    with open(SOURCE, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    rng = random.Random(SEED)
    parts = {"test": [], "dev": [], "train_pool": []}
    for is_mixed in (True, False):
        group = sorted((r for r in records if mixed(r) == is_mixed), key=lambda r: r["content"])
        rng.shuffle(group)
        n_test, n_dev = round(len(group) * TEST_FRACTION), round(len(group) * DEV_FRACTION)
        parts["test"] += group[:n_test]
        parts["dev"] += group[n_test:n_test + n_dev]
        parts["train_pool"] += group[n_test + n_dev:]
    for name, rows in parts.items():
        rows.sort(key=lambda r: r["content"])
        with open(HERE / "data" / f"finentity_{name}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        entities = [a["label"] for r in rows for a in r["annotations"]]
        print(f"{name}: {len(rows)} texts ({sum(map(mixed, rows))} mixed), {len(entities)} entities "
              f"{ {l: entities.count(l) for l in ('negative', 'neutral', 'positive')} }")
    texts = [{r["content"] for r in rows} for rows in parts.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])


if __name__ == "__main__":
    main()
