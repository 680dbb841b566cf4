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
