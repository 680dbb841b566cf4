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
