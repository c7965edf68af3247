#!/usr/bin/env python3
"""Static checks of the Dockerfile and its build context (run by deploy/validate.sh).

No container engine needed; standard library only.

* Every `COPY` source that comes from the build context exists and is let in by .dockerignore
  (Docker's rules: `*` and `?` stay within one path element, `**` spans any number, a pattern
  that matches a parent directory matches everything below it, the last matching line wins,
  `!` lets a path back in). A directory source must have at least one file let in, and no
  file below it may be left out by accident: the files left out are listed.
* Licences: every dataset folder under models/data (each with a PROVENANCE.md) is a training
  source of the demo model, so its PROVENANCE.md, its License.txt where it has one, and a
  notice deploy/docker/licenses/<dataset>/NOTICE are copied into the image; models/README.md
  is too; both runtime stages copy /usr/share/licenses/finserve from the demo-model stage and
  carry the OCI label org.opencontainers.image.licenses naming Apache-2.0 (the code) and
  CC-BY-NC-SA-3.0 (the demo model).

Exit 0 when everything passes, else 1.
"""
from __future__ import annotations

import os
import re
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTIME_STAGES = ("runtime", "runtime-cuda")
LICENSE_IDS = ("Apache-2.0", "CC-BY-NC-SA-3.0")


def pattern_regex(pat):
    """Docker's .dockerignore pattern (moby/patternmatcher) as a regular expression."""
    out, i = "", 0
    while i < len(pat):
        c = pat[i]
        if c == "*":
            if pat[i:i + 2] == "**":
                i += 2
                if pat[i:i + 1] == "/":
                    i += 1
                    out += "(?:.*/)?"
                else:
                    out += ".*"
                continue
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        else:
            out += re.escape(c)
        i += 1
    return re.compile("^" + out + "$")


def load_dockerignore(path):
    rules = []
    for line in open(path, encoding="utf-8"):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = os.path.normpath(line[1:] if neg else line).lstrip("/")
        rules.append((neg, pattern_regex(pat)))
    return rules


def excluded(rel, rules):
    parts = rel.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    out = False
    for neg, rx in rules:
        if any(rx.match(p) for p in prefixes):
            out = not neg
    return out


def dockerfile_instructions(path):
    """[(stage, instruction, args)] with continuation lines joined."""
    text = open(path, encoding="utf-8").read()
    lines, cur = [], ""
    for raw in text.splitlines():
        s = raw.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if cur and s.startswith("#"):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        lines.append(cur + s)
        cur = ""
    out, stage = [], None
    for line in lines:
        ins, _, rest = line.partition(" ")
        ins = ins.upper()
        if ins == "FROM":
            m = re.search(r"\bAS\s+(\S+)", rest, re.I)
            stage = m.group(1) if m else None
        out.append((stage, ins, rest.strip()))
    return out


def main():
    problems = []
    rules = load_dockerignore(os.path.join(ROOT, ".dockerignore"))
    instructions = dockerfile_instructions(os.path.join(ROOT, "Dockerfile"))
    context_sources = []
    for stage, ins, rest in instructions:
        if ins not in ("COPY", "ADD"):
            continue
        words = shlex.split(rest)
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        for src in words[:-1]:
            context_sources.append((stage, src))
            if src == ".":
                continue
            path = os.path.join(ROOT, src)
            rel = os.path.normpath(src)
            if not os.path.exists(path):
                problems.append(f"stage {stage}: COPY source {src} does not exist")
                continue
            if os.path.isdir(path):
                files = [os.path.relpath(os.path.join(d, f), ROOT)
                         for d, _, fs in os.walk(path) for f in fs]
                left_out = [f for f in files if excluded(f, rules)]
                if len(left_out) == len(files):
                    problems.append(f"stage {stage}: COPY {src}: .dockerignore leaves out all of it")
                elif left_out:
                    problems.append(f"stage {stage}: COPY {src}: .dockerignore leaves out {left_out}")
            elif excluded(rel, rules):
                problems.append(f"stage {stage}: COPY {src}: .dockerignore leaves it out of the build context")

    copied = {os.path.normpath(s) for _, s in context_sources if s != "."}

    def is_copied(rel):
        return rel in copied or any(rel.startswith(c + "/") for c in copied)

    need = ["models/README.md"]
    data = os.path.join(ROOT, "models", "data")
    datasets = sorted(d for d in os.listdir(data) if os.path.isfile(os.path.join(data, d, "PROVENANCE.md")))
    if not datasets:
        problems.append("no dataset folder with a PROVENANCE.md under models/data")
    for d in datasets:
        need.append(f"models/data/{d}/PROVENANCE.md")
        if os.path.isfile(os.path.join(data, d, "License.txt")):
            need.append(f"models/data/{d}/License.txt")
        notice = f"deploy/docker/licenses/{d}/NOTICE"
        if not os.path.isfile(os.path.join(ROOT, notice)):
            problems.append(f"no {notice} for the demo model's training set {d}")
        need.append(notice)
    need.append("deploy/docker/licenses/NOTICE")
    for rel in need:
        if not is_copied(rel):
            problems.append(f"{rel} is not copied into the image")

    for st in RUNTIME_STAGES:
        body = [(ins, rest) for stage, ins, rest in instructions if stage == st]
        if not body:
            problems.append(f"no stage {st}")
            continue
        if not any(ins == "COPY" and "--from=demo-model" in rest and "/usr/share/licenses/finserve" in rest
                   for ins, rest in body):
            problems.append(f"stage {st}: does not copy /usr/share/licenses/finserve from demo-model")
        labels = " ".join(rest for ins, rest in body if ins == "LABEL")
        m = re.search(r'org\.opencontainers\.image\.licenses="([^"]*)"', labels)
        if not m:
            problems.append(f"stage {st}: no LABEL org.opencontainers.image.licenses")
        elif not all(i in m.group(1) for i in LICENSE_IDS):
            problems.append(f"stage {st}: licenses label {m.group(1)!r} does not name {LICENSE_IDS}")
        for k in ("title", "version", "revision", "created", "description"):
            if f"org.opencontainers.image.{k}=" not in labels:
                problems.append(f"stage {st}: no LABEL org.opencontainers.image.{k}")

    if problems:
        for p in problems:
            print(f"FAIL Dockerfile/.dockerignore: {p}", file=sys.stderr)
        return 1
    print(f"ok: Dockerfile: {len(context_sources)} COPY sources in the build context; licence files of "
          f"{', '.join(datasets)} and models/README.md in the image; OCI licenses label on "
          f"{', '.join(RUNTIME_STAGES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
