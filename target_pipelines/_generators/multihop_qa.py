"""Generate the fictional corpus and the two-hop questions of the bundled ``multihop_qa`` target.

Deterministic: a seeded ``random.Random`` and no other source of entropy, so
running it again writes byte-identical ``multihop_qa/data/corpus.jsonl`` and
``multihop_qa/data/questions.jsonl``. Every name is invented, so no model can
answer from memory; similar names and shared attributes make retrieval non-trivial.

It lives outside the target folder on purpose: it rebuilds every label from
its seed, so a copy inside the target would let the pipeline (or a proposer)
derive the answers. Nothing under ``target_pipelines/_generators/`` is ever
part of a target.

    python target_pipelines/_generators/multihop_qa.py            # (re)write the target's data/
    python target_pipelines/_generators/multihop_qa.py --check    # exit 1 if data/ differs from what would be written
    python target_pipelines/_generators/multihop_qa.py --out DIR  # write the two files into DIR instead
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

SEED = 20240611
DATA_DIR = Path(__file__).resolve().parents[1] / "multihop_qa" / "data"

ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "qu", "r", "s", "st",
          "t", "th", "tr", "v", "w", "z", "sk", "fl", "pr", "cl"]
VOWELS = ["a", "e", "i", "o", "u", "ae", "ai", "ea", "io", "ou", "y"]
CODAS = ["", "", "", "n", "r", "l", "s", "th", "m", "rn", "ld", "x", "ck", "nd", "st"]
TOWN_ENDS = ["wick", "by", "ford", "holm", "stead", "mere", "dale", "ton", "bury", "mouth", "havn", "ly"]
SURNAME_ENDS = ["moor", "vale", "wright", "son", "ley", "ner", "ard", "ow", "ing", "ell", "ock", "en"]
INDUSTRIES = ["Instruments", "Textiles", "Ironworks", "Optics", "Shipping", "Mills", "Glassworks",
              "Foundry", "Chemicals", "Press"]
PROFESSIONS = ["engineer", "chemist", "clockmaker", "surveyor", "merchant", "physician", "architect",
               "glassblower", "printer", "navigator"]
DEVICE_ENDS = ["scope", "meter", "graph", "phone", "lathe", "loom", "press", "gauge", "lamp", "valve"]
DEVICE_KINDS = ["measuring device", "weaving machine", "signal lamp", "pressure gauge", "printing machine",
                "navigation aid", "optical device", "pump"]
MATERIALS = ["Brass", "Copper", "Iron", "Glass", "Steam", "Silver", "Oak", "Tin"]
PRODUCTS = ["wool", "cheese", "pottery", "salt", "timber", "cider", "lace", "copper"]
REGIONS = ["Dornhelm", "Varstad", "Ulmenreach", "Coldmarch", "Sarrow", "Penhallow"]


@dataclass
class World:
    rng: random.Random
    used: set[str] = field(default_factory=set)
    docs: list[dict] = field(default_factory=list)

    def word(self, syllables: int, end: str = "") -> str:
        while True:
            w = "".join(self.rng.choice(ONSETS) + self.rng.choice(VOWELS) for _ in range(syllables))
            w = (w + (end or self.rng.choice(CODAS))).capitalize()
            if w not in self.used and 4 <= len(w) <= 12:
                self.used.add(w)
                return w

    def add(self, doc_id: str, title: str, text: str) -> None:
        self.docs.append({"id": doc_id, "title": title, "text": text})


def build(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """The corpus and the questions, as lists of JSON-able rows."""
    rng = random.Random(seed)
    w = World(rng)

    rivers = [f"{w.word(2)} River" for _ in range(20)]
    for i, r in enumerate(rivers):
        w.add(f"river-{i:03d}", r, f"The {r} rises in the {w.word(2)} Hills and flows {rng.randrange(40, 600)} km "
              f"to the sea. Its valley is known for {rng.choice(PRODUCTS)}.")

    towns = [w.word(1, rng.choice(TOWN_ENDS)) for _ in range(60)]
    town_river = {t: rng.choice(rivers) for t in towns}
    for i, t in enumerate(towns):
        w.add(f"town-{i:03d}", t, f"{t} is a town in the {rng.choice(REGIONS)} region on the banks of the "
              f"{town_river[t]}. It is known for its {rng.choice(PRODUCTS)}.")

    # People come in families: a shared surname is a distractor for retrieval and for reading.
    people = []
    surnames = [w.word(1, rng.choice(SURNAME_ENDS)) for _ in range(55)]
    for s in surnames:
        for _ in range(rng.choice([1, 2, 2, 3])):
            people.append({"name": f"{w.word(1 + rng.randrange(2))} {s}", "surname": s,
                           "born": rng.choice(towns), "year": rng.randrange(1790, 1900),
                           "job": rng.choice(PROFESSIONS)})
    rng.shuffle(people)
    for i, p in enumerate(people):
        p["id"] = f"person-{i:03d}"
        text = f"{p['name']} was a {p['job']} born in {p['born']} in {p['year']}."
        if rng.random() < 0.5:  # a second town in the gold doc: read "born in", not "moved to"
            p["moved"] = rng.choice([t for t in towns if t != p["born"]])
            text += f" {p['surname']} later moved to {p['moved']}."
        w.add(p["id"], p["name"], text)

    # Companies share a first word with a sibling company, founded by someone else elsewhere.
    founders = rng.sample(people, 80)
    companies = []
    stems = [w.word(2) for _ in range(40)]
    for j, founder in enumerate(founders):
        stem = stems[j // 2]
        industry = rng.choice([x for x in INDUSTRIES if not any(c["name"] == f"{stem} {x}" for c in companies)])
        companies.append({"name": f"{stem} {industry}", "founder": founder, "hq": rng.choice(towns),
                          "year": rng.randrange(1820, 1950), "id": f"company-{j:03d}"})
    for c in companies:
        w.add(c["id"], c["name"], f"{c['name']} is a company founded in {c['year']} by {c['founder']['name']}. "
              f"It is headquartered in {c['hq']}.")

    inventors = rng.sample(people, 70)
    inventions = []
    for k, inv in enumerate(inventors):
        name = f"{rng.choice(MATERIALS)} {w.word(1, rng.choice(DEVICE_ENDS))}"
        inventions.append({"name": name, "inventor": inv, "year": inv["year"] + rng.randrange(20, 50),
                           "id": f"invention-{k:03d}"})
        w.add(f"invention-{k:03d}", name, f"The {name} is a {rng.choice(DEVICE_KINDS)} invented by "
              f"{inv['name']} in {inventions[-1]['year']}.")

    company_of = {c["founder"]["id"]: c for c in companies}
    town_id = {t: f"town-{i:03d}" for i, t in enumerate(towns)}
    candidates: list[tuple[str, str, list[str]]] = []
    for c in companies:
        f = c["founder"]
        candidates.append((f"In which town was the founder of {c['name']} born?", f["born"], [c["id"], f["id"]]))
        candidates.append((f"On which river is the town where {c['name']} is headquartered?",
                           town_river[c["hq"]], [c["id"], town_id[c["hq"]]]))
    for inv in inventions:
        p = inv["inventor"]
        candidates.append((f"In what year was the inventor of the {inv['name']} born?", str(p["year"]),
                           [inv["id"], p["id"]]))
        candidates.append((f"In which town was the inventor of the {inv['name']} born?", p["born"],
                           [inv["id"], p["id"]]))
        if p["id"] in company_of:
            c = company_of[p["id"]]
            candidates.append((f"Which company was founded by the inventor of the {inv['name']}?", c["name"],
                               [inv["id"], c["id"]]))
    for p in rng.sample(people, 30):
        candidates.append((f"Which river flows through the birthplace of {p['name']}?", town_river[p["born"]],
                           [p["id"], town_id[p["born"]]]))
    rng.shuffle(candidates)

    comparisons: list[tuple[str, str, list[str]]] = []
    while len(comparisons) < 40:
        if rng.random() < 0.5:
            a, b = rng.sample(people, 2)
            if a["year"] != b["year"]:
                first = a if a["year"] < b["year"] else b
                comparisons.append((f"Who was born first, {a['name']} or {b['name']}?", first["name"],
                                    [a["id"], b["id"]]))
        else:
            a, b = rng.sample(companies, 2)
            if a["year"] != b["year"]:
                first = a if a["year"] < b["year"] else b
                comparisons.append((f"Which company was founded earlier, {a['name']} or {b['name']}?",
                                    first["name"], [a["id"], b["id"]]))

    chosen = candidates[:200] + comparisons
    rng.shuffle(chosen)
    questions = [{"id": f"q-{n:03d}", "inputs": {"question": q}, "expected": ans, "evidence": ev}
                 for n, (q, ans, ev) in enumerate(chosen, 1)]
    return w.docs, questions


def render(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n" for r in rows).encode("utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the data folder instead of writing it")
    ap.add_argument("--out", type=Path, default=DATA_DIR, help=f"the data folder (default: {DATA_DIR})")
    args = ap.parse_args(argv)
    corpus, questions = build()
    files = {args.out / "corpus.jsonl": render(corpus), args.out / "questions.jsonl": render(questions)}
    if args.check:
        stale = [str(p) for p, b in files.items() if not p.is_file() or p.read_bytes() != b]
        for p in stale:
            print(f"stale: {p}", file=sys.stderr)
        return 1 if stale else 0
    for p, b in files.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b)
    print(f"wrote {len(corpus)} documents and {len(questions)} questions to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
