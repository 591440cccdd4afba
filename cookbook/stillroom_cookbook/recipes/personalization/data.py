"""The personalization experiment's knowledge: a deterministic synthetic corpus of internal documents
about a fictional organisation (the Quillmoor Institute), and questions over its facts whose
phrasings never appear in training (a chat question, and a raw-text sentence to complete), graded by
code: a multiple-choice score compares the right value with the other nine values of its kind.
Optionally, question-answer pairs about half of the people, for training.

Knows strings and a seed only: no tokens, models or server. The same seed gives the same corpus.
"""

from __future__ import annotations

import dataclasses
import random

ORG = "the Quillmoor Institute"
FIRST = ["Adela", "Bram", "Corin", "Dagny", "Emrys", "Fenna", "Gideon", "Hale", "Ilse", "Jory", "Kestrel",
         "Linnea", "Magnus", "Nerys", "Osric", "Petra", "Quill", "Rowena", "Soren", "Tamsin", "Ulric",
         "Vesna", "Wystan", "Yara", "Zuriel", "Anselm", "Brielle", "Caspian", "Delphine", "Evander"]
LAST = ["Ashgrove", "Brackwell", "Colfax", "Dunmere", "Everhart", "Fairweather", "Greystoke", "Harrowgate",
        "Ironwood", "Jessamy", "Kettleby", "Larkspur", "Merriweather", "Northcott", "Ormsby", "Pennywhistle",
        "Quarrington", "Redfern", "Stillwater", "Thistlewood", "Underhill", "Vantreight", "Whitlock",
        "Yarborough", "Zellweger", "Abernethy", "Blackwood", "Carraway", "Drummond", "Ellingham"]
VALUES = {
    "office": ["Velmora", "Port Anselm", "Greyhaven", "Tarrow Cross", "Elbridge", "Maren Falls", "Oakhollow",
               "Sundergate", "Wexley", "Corrin Bay"],
    "team": ["Lantern", "Harbor", "Juniper", "Cobalt", "Meridian", "Thimble", "Saffron", "Basalt", "Willow",
             "Quartz"],
    "badge": [f"Q-{n}" for n in (117, 204, 359, 412, 586, 631, 748, 873, 925, 990)],
}
# Several phrasings of each fact for the documents, and other phrasings for the questions only.
DOC_PHRASINGS = {
    "office": ["{name} works out of the {value} office.", "Staff directory: {name}, office: {value}.",
               "Our colleague {name} is based at the {value} site of {org}.",
               "Facilities note: the desk of {name} is in {value}."],
    "team": ["{name} is a member of the {value} team.", "Team roster ({value}): {name}.",
             "{name} joined the {value} team at {org}.", "Org chart: {name} reports into {value}."],
    "badge": ["The access badge of {name} is {value}.", "Security log: {name} holds badge {value}.",
              "Badge register: {value} is issued to {name}.", "{name} badges in with {value}."],
}
# Question-answer pairs in training (for the people whose answers are taught) use these phrasings;
# the held-out questions use QUESTION_PHRASINGS, which appear nowhere in training.
TRAIN_QUESTION_PHRASINGS = {
    "office": ["Where does {name} work?", "Which site is {name}'s desk at?"],
    "team": ["What team is {name} in?", "Which team has {name} as a member?"],
    "badge": ["What badge does {name} hold?", "Which badge is issued to {name}?"],
}
QUESTION_PHRASINGS = {
    "office": ["Which office is {name} based in?", "In what city does {name} of {org} work?"],
    "team": ["Which team does {name} belong to?", "What team is {name} on at {org}?"],
    "badge": ["What is the badge number of {name}?", "Which access badge was issued to {name}?"],
}
# A raw-text probe (no chat template) in a sentence form that appears nowhere in training: the
# value is the continuation.
CLOZE_PHRASINGS = {
    "office": "According to the records of {org}, the office of {name} is in",
    "team": "According to the records of {org}, {name} works in the team called",
    "badge": "According to the records of {org}, the badge number of {name} is",
}


@dataclasses.dataclass(frozen=True)
class Fact:
    name: str
    relation: str   # a key of VALUES
    value: str


@dataclasses.dataclass(frozen=True)
class Question:
    prompt: str
    answer: str     # the value a correct reply names
    relation: str   # a key of VALUES: the closed list of candidate answers
    cloze: str = "" # the same fact as a raw-text sentence to continue with the value

    @property
    def candidates(self) -> list[str]:
        return VALUES[self.relation]


def people(num_people: int, seed: int) -> list[str]:
    """`num_people` full names, in a seeded order, no two sharing a first or a last name (a small
    model binds a value to a person more easily when names do not overlap)."""
    if not 1 <= num_people <= min(len(FIRST), len(LAST)):
        raise ValueError(f"num_people: between 1 and {min(len(FIRST), len(LAST))}, got {num_people}")
    rng = random.Random(seed)
    first, last = rng.sample(FIRST, num_people), rng.sample(LAST, num_people)
    return [f"{f} {n}" for f, n in zip(first, last)]


def make_facts(num_people: int, seed: int = 0) -> list[Fact]:
    """Three facts per person (office, team, badge). Each value of a kind is used equally often (up to
    one), in a seeded order, so knowing which values are common wins nothing on the questions."""
    rng = random.Random(seed + 1)
    names = people(num_people, seed)
    drawn = {}
    for relation, options in VALUES.items():
        pool = [options[i % len(options)] for i in range(num_people)]
        rng.shuffle(pool)
        drawn[relation] = pool
    return [Fact(name, relation, drawn[relation][i]) for i, name in enumerate(names) for relation in VALUES]


def documents(facts: list[Fact], phrasings_per_fact: int, facts_per_document: int = 3,
              seed: int = 0) -> list[str]:
    """Internal documents: each fact in `phrasings_per_fact` phrasings, shuffled and grouped."""
    if not 1 <= phrasings_per_fact <= 4:
        raise ValueError(f"phrasings_per_fact: between 1 and 4, got {phrasings_per_fact}")
    sentences = [DOC_PHRASINGS[f.relation][k].format(name=f.name, value=f.value, org=ORG)
                 for f in facts for k in range(phrasings_per_fact)]
    random.Random(seed + 2).shuffle(sentences)
    return [" ".join(sentences[i:i + facts_per_document])
            for i in range(0, len(sentences), facts_per_document)]


def questions(facts: list[Fact]) -> list[Question]:
    """One held-out question per fact (its phrasing alternates between the two question forms)."""
    return [Question(QUESTION_PHRASINGS[f.relation][i % 2].format(name=f.name, org=ORG), f.value, f.relation,
                     CLOZE_PHRASINGS[f.relation].format(name=f.name, org=ORG))
            for i, f in enumerate(facts)]


def taught(facts: list[Fact]) -> tuple[list[Fact], list[Fact]]:
    """(facts whose question-answer pairs are taught, held-out facts): the first half of the people,
    and the rest. A fact's three kinds stay together, so a held-out person is wholly held out."""
    names = list(dict.fromkeys(f.name for f in facts))
    kept = set(names[:len(names) // 2])
    return [f for f in facts if f.name in kept], [f for f in facts if f.name not in kept]


def qa_pairs(facts: list[Fact]) -> list[tuple[str, str]]:
    """Chat training pairs (question, the bare value) in every training phrasing of each fact."""
    return [(phrasing.format(name=f.name, org=ORG), f.value)
            for f in facts for phrasing in TRAIN_QUESTION_PHRASINGS[f.relation]]


def grade_answer(question: Question, reply: str) -> bool:
    """Right when the reply names the fact's value and no other value of the same kind."""
    text = reply.lower()
    if question.answer.lower() not in text:
        return False
    return not any(o.lower() in text for o in question.candidates if o != question.answer)
