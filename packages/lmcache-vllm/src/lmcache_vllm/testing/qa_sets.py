"""Synthetic multi-document QA sets: for non-prefix KV reuse (blending) and the main job.

Each item is a handful of short documents. Each document holds one fact of
its own kind about one invented person (where they live, their job, their
dog's name, their instrument, colour or birth year), amid neutral sentences;
the documents are separated by the blend separator and followed by a
completion-style question about one of them ("... Answer: Mira Castell
lives in"). The facts are distinct in kind so the question has one answer;
the model must still find it among the documents. A 135M model answers
these well from a full prefill (about 90%); with several facts of one kind
per item, or chat-style questions, it answers about half, which would
measure the model, not the cache.

Every item comes with two orders of the same documents: ``warm_order``, in
which the documents are first seen (and stored), and ``order``, in which they
are asked about (and reused at other positions).

    make_items(50)
    make_items(4, docs=(4, 4), doc_tokens=1000)

``doc_tokens`` pads each document with neutral sentences to about that many
tokens (counted as words x 1.3). ``tools/make_blend_qa.py`` writes a set as
JSON.
"""

from __future__ import annotations

import random

SEPARATOR = " # # "
# fmt: off
FIRST = [
    "Mira", "Jonas", "Talia", "Oskar", "Ines", "Rafael", "Greta", "Lukas", "Amara", "Felix",
    "Noor", "Henrik", "Sofia", "Milan", "Yara", "Tobias", "Elena", "Bruno", "Leila", "Anton",
    "Clara", "Viktor", "Hana", "Emil", "Zara", "Pavel", "Lina", "Marco", "Ada", "Soren",
]
LAST = [
    "Castell", "Berg", "Okafor", "Lindqvist", "Moreau", "Vasquez", "Halloran", "Petrov",
    "Nakamura", "Ferreira", "Dahl", "Kowalski", "Brandt", "Costa", "Ibsen", "Marsh", "Novak",
    "Quint", "Rossi", "Sato", "Tanaka", "Ulrich", "Varga", "Weiss", "Young", "Zeller",
]
CITIES = [
    "Lisbon", "Oslo", "Nairobi", "Montreal", "Kyoto", "Valparaiso", "Tallinn", "Marrakesh",
    "Dublin", "Hanoi", "Bergen", "Seville", "Krakow", "Auckland", "Lima", "Porto", "Zagreb",
]
TRADES = [
    "glassblower", "baker", "surgeon", "carpenter", "pilot", "librarian", "chemist",
    "fisherman", "architect", "beekeeper", "jeweller", "tailor", "geologist",
]
# fmt: on
# kind -> (values, fact sentence, question, the answer's start)
KINDS: dict[str, tuple[list[str], str, str, str]] = {
    "city": (CITIES, "{n} lives in {v}.", "In which city does {n} live?", "{n} lives in"),
    "trade": (TRADES, "{n} works as a {v}.", "What is {n}'s job?", "{n} works as a"),
    "dog": (
        ["Pepper", "Biscuit", "Juno", "Mango", "Olive", "Rocket", "Sable", "Waffle"],
        "{n} has a dog called {v}.",
        "What is the name of {n}'s dog?",
        "{n}'s dog is called",
    ),
    "instrument": (
        ["cello", "flute", "trumpet", "harp", "drums", "piano", "banjo", "oboe"],
        "{n} plays the {v}.",
        "Which instrument does {n} play?",
        "{n} plays the",
    ),
    "colour": (
        ["red", "green", "purple", "orange", "yellow", "silver", "turquoise"],
        "{n}'s favourite colour is {v}.",
        "What is {n}'s favourite colour?",
        "{n}'s favourite colour is",
    ),
    "year": (
        [str(y) for y in range(1950, 2000)],
        "{n} was born in {v}.",
        "When was {n} born?",
        "{n} was born in",
    ),
}
FILLER = [
    "The notes were copied out by hand from an old ledger.",
    "Nobody remembers who first wrote them down.",
    "The paper is yellow at the edges and smells of dust.",
    "Some of the pages were repaired with tape long ago.",
    "A few lines are smudged, but the rest is easy to read.",
    "The handwriting slopes gently to the right.",
    "It was a quiet afternoon when the page was filed.",
    "The archive keeps such pages in grey cardboard boxes.",
    "Each box is labelled with a number and a short title.",
    "Visitors may read the pages but not take them home.",
    "The reading room closes at six in the evening.",
    "A clerk checks every box before it goes back on the shelf.",
]


def make_items(
    n_items: int, *, docs: tuple[int, int] = (4, 6), doc_tokens: int = 40, seed: int = 0
) -> list[dict]:
    """``n_items`` items of ``docs`` documents of about ``doc_tokens`` tokens each."""
    rnd = random.Random(seed)
    names = [f"{a} {b}" for a in FIRST for b in LAST]
    items = []
    for _ in range(n_items):
        k = rnd.randint(*docs)
        kinds = [rnd.choice(sorted(KINDS)) for _ in range(k)]
        if k <= len(KINDS):
            kinds = rnd.sample(sorted(KINDS), k)
        people = rnd.sample(names, k)
        texts, facts = [], []
        for kind, name in zip(kinds, people):
            values, fact, _, _ = KINDS[kind]
            value = rnd.choice(values)
            sentences = [fact.format(n=name, v=value)]
            while len(" ".join(sentences).split()) * 1.3 < doc_tokens:
                sentences.insert(rnd.randint(0, len(sentences)), rnd.choice(FILLER))
            texts.append(" ".join(sentences))
            facts.append((kind, name, value))
        target = rnd.randrange(k)
        kind, name, value = facts[target]
        order = list(range(k))
        rnd.shuffle(order)
        items.append(
            {
                "docs": texts,
                "order": order,
                "warm_order": list(reversed(order)),
                "question": KINDS[kind][2].format(n=name),
                "lead": KINDS[kind][3].format(n=name),
                "answer": value,
            }
        )
    return items


def make_linked_items(
    n_items: int, *, pairs: int = 2, doc_tokens: int = 40, seed: int = 0
) -> list[dict]:
    """Items whose answer needs two documents read together (CacheBlend's cross-attention).

    Each person takes two passages, as a chunked document does: the first ends
    by naming them ("This page is about Mira Castell."), the second states the
    fact without the name ("They live in Oslo."). Every person's fact is of the
    same kind, so only the link from a fact to the name before it tells the
    answer. In ``order`` each person's passages are adjacent; in ``warm_order``
    every fact passage follows *another* person's first passage, so its stored
    KV links the fact to the wrong name: reuse at ratio 0 inherits that link,
    and only recomputing the fact's tokens with their new neighbours fixes it.
    """
    rnd = random.Random(seed)
    names = [f"{a} {b}" for a in FIRST for b in LAST]
    linked = {"city": "They live in {v}.", "trade": "They work as a {v}."}
    items = []
    for _ in range(n_items):
        kind = rnd.choice(sorted(linked))
        values, _, question, lead = KINDS[kind]
        people = rnd.sample(names, pairs)
        facts = rnd.sample(values, pairs)
        docs: list[str] = []
        for name, value in zip(people, facts):
            intro = [f"This page is about {name}."]
            while len(" ".join(intro).split()) * 1.3 < doc_tokens:
                intro.insert(0, rnd.choice(FILLER))
            fact = [linked[kind].format(v=value)]
            while len(" ".join(fact).split()) * 1.3 < doc_tokens:
                fact.append(rnd.choice(FILLER))
            docs += [" ".join(intro), " ".join(fact)]
        perm = list(range(pairs))
        rnd.shuffle(perm)
        order = [d for i in perm for d in (2 * i, 2 * i + 1)]
        warm = [d for i in perm for d in (2 * i, 2 * ((i + 1) % pairs) + 1)]
        target = rnd.randrange(pairs)
        items.append(
            {
                "docs": docs,
                "order": order,
                "warm_order": warm,
                "question": question.format(n=people[target]),
                "lead": lead.format(n=people[target]),
                "answer": facts[target],
            }
        )
    return items


# ---------------------------------------------------------------------------- hard sets
#
# Sets where a small model is unsure (a full prefill answers about half), so a
# change to the KV shows in the answers. Every person in an item gets a fact of
# one kind (where they were born), so only the link from the fact to its name
# tells the answer. ``make_set`` names them all.

PETS = ["Pepper", "Biscuit", "Juno", "Mango", "Olive", "Rocket", "Sable", "Waffle"]
INSTRUMENTS = ["cello", "flute", "trumpet", "harp", "drums", "piano", "banjo", "oboe"]
HABITS = [
    "walks along the river every morning",
    "collects old maps",
    "drinks strong tea at noon",
    "keeps a diary in green ink",
    "swims in the sea all year",
    "grows tomatoes on the balcony",
    "repairs bicycles for the neighbours",
    "sings in a small choir",
]


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _people(rnd: random.Random, k: int) -> list[str]:
    """``k`` names, no two sharing a first or last name (a shared part would blur the link)."""
    firsts, lasts = rnd.sample(FIRST, k), rnd.sample(LAST, k)
    return [f"{a} {b}" for a, b in zip(firsts, lasts)]


def _orders(rnd: random.Random, k: int) -> tuple[list[int], list[int]]:
    order = list(range(k))
    rnd.shuffle(order)
    return order, list(reversed(order))


def _birthplace_item(
    rnd: random.Random, docs: list[str], people: list[str], cities: list[str], target: int
) -> dict:
    order, warm = _orders(rnd, len(docs))
    name = people[target]
    return {
        "docs": docs,
        "order": order,
        "warm_order": warm,
        "question": f"Where was {name} born?",
        "lead": f"{name} was born in",
        "answer": cities[target],
    }


def make_shared_items(
    n_items: int, *, docs: int = 4, doc_tokens: int = 110, seed: int = 0
) -> list[dict]:
    """Documents that share all their sentences but one (templated pages, logs, records).

    In an item, every document is the same run of filler sentences with one
    fact inserted at its own place: "<person> was born in <city>." Persons and
    cities are distinct. A full prefill of such a prompt attends across the
    repeated sentences, so a document's KV depends on its neighbours far more
    than a distinct document's does.
    """
    rnd = random.Random(seed)
    items = []
    for _ in range(n_items):
        people, cities = _people(rnd, docs), rnd.sample(CITIES, docs)
        base: list[str] = []
        while len(" ".join(base).split()) * 1.3 < doc_tokens - 8:
            base.append(rnd.choice([f for f in FILLER if f not in base]))
        texts = []
        for name, city in zip(people, cities):
            sentences = list(base)
            sentences.insert(rnd.randint(0, len(base)), f"{name} was born in {city}.")
            texts.append(" ".join(sentences))
        items.append(_birthplace_item(rnd, texts, people, cities, rnd.randrange(docs)))
    return items


def make_bio_items(
    n_items: int, *, docs: int = 4, distractors: int = 1, seed: int = 0
) -> list[dict]:
    """Distinct short biographies with several facts each, and distractor facts.

    Each document is about one person: where they were born, their job, their
    instrument, their dog and a habit, in a shuffled order, plus
    ``distractors`` facts of the asked kind about *other* people ("Their
    cousin <name> was born in <city>."). The question asks one document's
    person where they were born; the distractors' cities are other cities.
    """
    rnd = random.Random(seed)
    items = []
    for _ in range(n_items):
        people = _people(rnd, docs * (1 + distractors))
        mains, others = people[:docs], people[docs:]
        cities = rnd.sample(CITIES, docs * (1 + distractors))
        texts = []
        for i, name in enumerate(mains):
            first = name.split()[0]
            facts = [
                f"{name} was born in {cities[i]}.",
                f"{first} works as {_a(rnd.choice(TRADES))}.",
                f"{first} plays the {rnd.choice(INSTRUMENTS)}.",
                f"{first} has a dog called {rnd.choice(PETS)}.",
                f"{first} {rnd.choice(HABITS)}.",
            ]
            for j in range(distractors):
                o = docs + i * distractors + j
                kin = rnd.choice(["cousin", "neighbour", "old friend", "teacher"])
                facts.append(f"{first}'s {kin} {others[o - docs]} was born in {cities[o]}.")
            rest = facts[1:]
            rnd.shuffle(rest)
            texts.append(" ".join([facts[0], *rest] if rnd.random() < 0.5 else [*rest, facts[0]]))
        items.append(_birthplace_item(rnd, texts, mains, cities, rnd.randrange(docs)))
    return items


#: The fields of a record, in the order every record lists them.
RECORD_FIELDS = ("Name", "Place of birth", "Occupation", "Instrument", "Pet", "Year")


def make_record_items(n_items: int, *, docs: int = 4, seed: int = 0) -> list[dict]:
    """Records of one template (forms, rows of a register): same labels, other values.

    Each document is a record "Register entry 4812. Name: ... Place of birth:
    ... Occupation: ..." with the fields of :data:`RECORD_FIELDS`, and the
    question asks one record's place of birth. Unlike :func:`make_shared_items`
    the documents share their labels, not their sentences: every field's value
    differs, so the model must keep each value with its own record.
    """
    rnd = random.Random(seed)
    items = []
    for _ in range(n_items):
        people, cities = _people(rnd, docs), rnd.sample(CITIES, docs)
        entries = rnd.sample(range(1000, 9999), docs)
        texts = []
        for name, city, entry in zip(people, cities, entries):
            values = [
                name,
                city,
                rnd.choice(TRADES),
                rnd.choice(INSTRUMENTS),
                rnd.choice(PETS),
                str(rnd.randint(1950, 1999)),
            ]
            fields = " ".join(f"{k}: {v}." for k, v in zip(RECORD_FIELDS, values))
            texts.append(f"Register entry {entry}. {fields} Entry checked by the clerk.")
        items.append(_birthplace_item(rnd, texts, people, cities, rnd.randrange(docs)))
    return items


#: Every set, by the name benchmarks and ``tools/make_blend_qa.py`` use; each a
#: ``(n_items, seed) -> items`` with the sizes the benchmarks measured.
SETS = {
    "facts": lambda n, seed: make_items(n, doc_tokens=80, seed=seed),
    "linked": lambda n, seed: make_linked_items(n, doc_tokens=60, seed=seed),
    "shared": lambda n, seed: make_shared_items(n, seed=seed),
    "bios": lambda n, seed: make_bio_items(n, seed=seed),
    "records": lambda n, seed: make_record_items(n, seed=seed),
}
#: The sets a small model finds hard (a full prefill far from 100%).
HARD_SETS = ("shared", "bios", "linked", "records")


def make_set(name: str, n_items: int, seed: int = 0) -> list[dict]:
    """``n_items`` items of the set ``name`` (see :data:`SETS`)."""
    if name not in SETS:
        raise ValueError(f"unknown QA set {name!r}: one of {', '.join(SETS)}")
    return SETS[name](n_items, seed)


def render(item: dict, order: list[int] | None = None, question: str | None = None) -> str:
    """The prompt: an instruction, the documents, the question and the answer's start."""
    order = item["order"] if order is None else order
    q = item["question"] if question is None else question
    head = "Read the notes about people and answer the question."
    body = SEPARATOR.join(item["docs"][i] for i in order)
    lead = item["lead"] if question is None else ""
    return f"{head}{SEPARATOR}{body}{SEPARATOR}Question: {q}\nAnswer: {lead}"


def warm_prompt(item: dict) -> str:
    """The same documents in another order, with another question: what stores them."""
    return render(item, item["warm_order"], "Who is mentioned first?")


def is_correct(item: dict, completion: str) -> bool:
    return item["answer"].lower() in completion.lower()[: len(item["answer"]) + 24]
