"""The personalization corpus: distinct names, balanced values, and question forms (chat and cloze)
that never appear in the training text."""

from __future__ import annotations

from collections import Counter

import pytest

from stillroom_cookbook.recipes.personalization import data as corpus


def test_people_share_no_first_or_last_name():
    names = corpus.people(30, seed=0)
    assert len({n.split()[0] for n in names}) == len({n.split()[1] for n in names}) == 30
    with pytest.raises(ValueError, match="num_people"):
        corpus.people(31, seed=0)


def test_values_are_balanced_and_the_corpus_is_deterministic():
    facts = corpus.make_facts(20)
    for relation in corpus.VALUES:
        counts = Counter(f.value for f in facts if f.relation == relation)
        assert max(counts.values()) - min(counts.values()) <= 1
    assert corpus.documents(facts, 4) == corpus.documents(corpus.make_facts(20), 4)


def test_questions_and_cloze_sentences_never_appear_in_training():
    facts = corpus.make_facts(12)
    taught, held_out = corpus.taught(facts)
    assert {f.name for f in taught}.isdisjoint(f.name for f in held_out)
    training = " ".join(corpus.documents(facts, 4)) + " ".join(q for q, _ in corpus.qa_pairs(taught))
    for q in corpus.questions(facts):
        assert q.prompt not in training and q.cloze not in training
        assert q.answer in q.candidates and q.cloze.endswith(("in", "called", "is"))
