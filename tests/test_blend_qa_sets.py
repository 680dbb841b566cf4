"""The QA sets blending is measured with (lmcache_vllm.testing.qa_sets): each item is what
it claims."""

from __future__ import annotations

from lmcache_vllm.testing import qa_sets as qa


def test_linked_items_need_both_passages_and_are_stored_with_the_wrong_links():
    for it in qa.make_linked_items(40, pairs=3, seed=5):
        docs, order, warm = it["docs"], it["order"], it["warm_order"]
        assert sorted(order) == sorted(warm) == list(range(len(docs)))
        intros = {
            i: d.rsplit("This page is about ", 1)[1].rstrip(".")
            for i, d in enumerate(docs)
            if i % 2 == 0
        }
        # Asked: each person's fact passage right after the passage that names them.
        for a, b in zip(order[::2], order[1::2]):
            assert b == a + 1 and a in intros
        # Stored: every fact passage after another person's name.
        for a, b in zip(warm[::2], warm[1::2]):
            assert a in intros and b != a + 1
        # The facts are of one kind, distinct, and none names its person.
        facts = [docs[i] for i in range(1, len(docs), 2)]
        assert all(f.startswith(("They live in", "They work as a")) for f in facts)
        assert len({f.split(".")[0] for f in facts}) == len(facts)
        assert not any(name in f for f in facts for name in intros.values())
        target = next(i for i in intros if intros[i] in it["question"])
        assert it["answer"] in docs[target + 1].split(".")[0]
        prompt = qa.render(it)
        assert prompt.endswith(it["lead"]) and qa.is_correct(it, f" {it['answer']}.")


def _sentences(doc: str) -> list[str]:
    return [s.strip() + "." for s in doc.split(".") if s.strip()]


def _common_item_checks(it: dict) -> None:
    k = len(it["docs"])
    assert sorted(it["order"]) == sorted(it["warm_order"]) == list(range(k))
    assert it["order"] != it["warm_order"]  # the documents are reused at other positions
    prompt = qa.render(it)
    assert prompt.endswith(it["lead"]) and qa.is_correct(it, f" {it['answer']}.")
    assert qa.warm_prompt(it) != prompt and it["question"] not in qa.warm_prompt(it)
    # One answer: the asked city stands in exactly one document.
    assert sum(it["answer"] in d for d in it["docs"]) == 1


def test_shared_items_differ_in_one_sentence_of_one_kind():
    for it in qa.make_shared_items(30, seed=4):
        _common_item_checks(it)
        docs = [_sentences(d) for d in it["docs"]]
        facts = [[s for s in d if " was born in " in s] for d in docs]
        assert all(len(f) == 1 for f in facts)
        rest = [[s for s in d if " was born in " not in s] for d in docs]
        assert all(r == rest[0] for r in rest)  # every other sentence shared, in order
        assert len(rest[0]) >= 4 * len(facts[0])  # ... and they are most of the text
        people = [f[0].split(" was born in ")[0] for f in facts]
        assert len(set(people)) == len(people)
        target = next(i for i, p in enumerate(people) if p in it["question"])
        assert facts[target][0].endswith(f"born in {it['answer']}.")


def test_bio_items_are_distinct_with_several_facts_and_a_distractor_each():
    for it in qa.make_bio_items(30, seed=4):
        _common_item_checks(it)
        docs = [_sentences(d) for d in it["docs"]]
        seen: set[str] = set()
        for d in docs:
            assert len(d) >= 6  # birthplace, job, instrument, dog, habit, distractor
            assert not seen & set(d)  # distinct documents: no sentence repeats across them
            seen |= set(d)
            born = [s for s in d if " was born in " in s]
            assert len(born) == 2  # the person's own and a distractor's, both of the asked kind
        asked = it["question"].removeprefix("Where was ").removesuffix(" born?")
        main = [s for d in docs for s in d if s.startswith(f"{asked} was born in ")]
        assert main == [f"{asked} was born in {it['answer']}."]
        # The distractors name other people, none of them asked.
        others = [s for d in docs for s in d if "'s " in s and " was born in " in s]
        assert len(others) == len(docs) and not any(asked in s for s in others)


def test_record_items_share_a_template_and_no_values():
    for it in qa.make_record_items(30, seed=4):
        _common_item_checks(it)
        labels = [[p.split(":")[0] for p in _sentences(d) if ":" in p] for d in it["docs"]]
        assert all(lab == list(qa.RECORD_FIELDS) for lab in labels)
        values = [
            [p.split(": ", 1)[1].rstrip(".") for p in _sentences(d) if ": " in p]
            for d in it["docs"]
        ]
        names = [v[0] for v in values]
        births = [v[1] for v in values]
        assert len(set(names)) == len(set(births)) == len(it["docs"])
        assert it["answer"] == births[next(i for i, n in enumerate(names) if n in it["question"])]


def test_every_set_is_named_and_reproducible():
    for name in qa.SETS:
        a, b = qa.make_set(name, 3, seed=9), qa.make_set(name, 3, seed=9)
        assert a == b and a != qa.make_set(name, 3, seed=10)
    assert set(qa.HARD_SETS) <= set(qa.SETS)
    try:
        qa.make_set("nope", 1)
    except ValueError as e:
        assert "facts" in str(e)
    else:
        raise AssertionError("an unknown set name must be refused")
