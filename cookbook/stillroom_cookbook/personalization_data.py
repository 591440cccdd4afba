"""The personalization experiment's knowledge: a deterministic synthetic corpus of internal documents
about a fictional organisation (the Quillmoor Institute), and questions over its facts whose
phrasings never appear in the documents, graded by code: a reply must name the right value, and a
multiple-choice score compares the right value with the other nine values of its kind.

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
        "Quarrington", "Redfern", "Stillwater", "Thistlewood"]
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
QUESTION_PHRASINGS = {
    "office": ["Which office is {name} based in?", "In what city does {name} of {org} work?"],
    "team": ["Which team does {name} belong to?", "What team is {name} on at {org}?"],
    "badge": ["What is the badge number of {name}?", "Which access badge was issued to {name}?"],
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

    @property
    def candidates(self) -> list[str]:
        return VALUES[self.relation]


def people(num_people: int, seed: int) -> list[str]:
    """`num_people` distinct full names, in a seeded order."""
    names = [f"{first} {last}" for first in FIRST for last in LAST]
    random.Random(seed).shuffle(names)
    if num_people > len(names):
        raise ValueError(f"num_people: at most {len(names)}, got {num_people}")
    return names[:num_people]


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
    return [Question(QUESTION_PHRASINGS[f.relation][i % 2].format(name=f.name, org=ORG), f.value, f.relation)
            for i, f in enumerate(facts)]


def grade_answer(question: Question, reply: str) -> bool:
    """Right when the reply names the fact's value and no other value of the same kind."""
    text = reply.lower()
    if question.answer.lower() not in text:
        return False
    return not any(o.lower() in text for o in question.candidates if o != question.answer)
