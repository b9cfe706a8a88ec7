"""The embedded default corpus: an invented world of people, organisations, places,
products and sports teams whose facts change over snapshots T0..Tn.

Each snapshot renders one Wikipedia-like article per entity (in `docs_per_entity`
paraphrased variants; `new_docs_per_entity` for entities born after T0). Between
snapshots a share of the known entities gets one or two facts changed and new entities
appear (`change_restatements` restates each change in more templates), so every later
stage has exact ground truth:
`triples` says which facts hold when, `mentions` says where each entity is named.

Rules that keep that ground truth exact:
- names and aliases are unique, and none is a substring of another entity's name or
  alias or of any word the templates use, so dictionary tagging finds exactly the
  mentions the renderer wrote;
- an article is a function of its entity's facts only: unchanged entities render
  byte-identical text in every snapshot, an updated one differs only in the sentences
  about the changed facts plus an appended "In 2019, ..." sentence;
- every object string appears literally in its subject's article.

Probes use phrasings (`PROBE_TEMPLATES`, `probe_prefix`) that no article uses. A small
model trained from scratch memorises facts in the wording it read but cannot answer
them in a wording it never saw (our 1.4M-parameter default: about 70% top-1 in document
wording, 5% in probe wording). So the world follows Allen-Zhu & Li's "mixed training"
(Physics of Language Models 3.1): a seeded share of the entities (`probe_worded_share`)
also gets an infobox document (`<id>_facts`) that states each of its facts in probe
wording, placed after all articles of the snapshot. The model learns how probe
questions map to stored facts from those entities; probes are only made for the others
(`gradloc probes` drops every probe whose statement occurs in its subject's text), so
the probed facts are never seen in the probe's wording.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import pandas as pd

from ..io import InputError
from ..schema import fill
from . import DOC_COLUMNS, ENTITY_COLUMNS, TRIPLE_COLUMNS

MIN_ENTITIES = 8
BASE_YEAR = 2018  # the year of T0; snapshot k is BASE_YEAR + k

# Entity i gets kind KIND_CYCLE[i % 20]: the same mix at every world size, and the first
# 8 entities already hold two persons, organisations and places, so every entity-valued
# relation has a choice of objects.
_CODES = {"P": "person", "O": "organisation", "L": "place", "R": "product", "T": "team"}
KIND_CYCLE = [_CODES[c] for c in "POLPRPOLTPROPLPTOPRP"]

# relation -> kind of its object: an entity kind, or a literal value kind.
RELATIONS = {
    "employer": "organisation", "position": "position", "residence": "place", "birthplace": "place",
    "headquarters": "place", "founded": "year", "chief executive": "person", "industry": "industry",
    "country": "country", "mayor": "person", "population": "number",
    "maker": "organisation", "launched": "year", "category": "category",
    "home city": "place", "coach": "person", "league": "league",
}
ENTITY_KINDS = ("person", "organisation", "place", "product", "team")
SCHEMA = {  # kind -> its relations, in the order of a lead article
    "person": ["position", "employer", "residence", "birthplace"],
    "organisation": ["industry", "headquarters", "founded", "chief executive"],
    "place": ["country", "population", "mayor"],
    "product": ["category", "maker", "launched"],
    "team": ["home city", "league", "founded", "coach"],
}
MUTABLE = {  # relations whose object may change between snapshots
    "person": ["employer", "position", "residence"],
    "organisation": ["headquarters", "chief executive"],
    "place": ["mayor", "population"],
    "product": ["maker"],
    "team": ["coach", "league"],
}

# Document sentences: {s} subject, {o} object, {a} "a"/"an" before the object. Four
# paraphrases per relation; one of them states the relation by its noun ("X's employer
# is Y"), the bridge a small model needs to answer the probe phrasing below.
DOC_TEMPLATES = {
    "employer": ["{s} works for {o}.", "{s} is employed by {o}.", "{s}'s employer is {o}.", "{s} has a job at {o}."],
    "position": ["{s} works as {a} {o}.", "By profession, {s} is {a} {o}.", "{s}'s profession is {o}.",
                 "{s} has a career as {a} {o}."],
    "residence": ["{s} lives in {o}.", "{s} resides in {o}.", "{s}'s home is in {o}.", "{s} has a house in {o}."],
    "birthplace": ["{s} was born in {o}.", "{s} is a native of {o}.", "{s}'s birthplace is {o}.",
                   "{s} comes from {o}."],
    "headquarters": ["{s} is based in {o}.", "{s} has its head office in {o}.", "{s}'s headquarters are in {o}.",
                     "{s} runs its business from {o}."],
    "founded": ["{s} was established in {o}.", "{s} has existed since {o}.", "{s}'s founding year is {o}.",
                "{s} was set up in {o}."],
    "chief executive": ["{s} is led by {o}.", "{o} heads {s}.", "{s}'s chief executive is {o}.",
                        "{o} runs {s} as chief executive."],
    "industry": ["{s} is active in {o}.", "{s} operates in the {o} sector.", "{s}'s industry is {o}.",
                 "{s} is {a} {o} company."],
    "country": ["{s} is a city in {o}.", "{s} lies in {o}.", "{s}'s country is {o}.", "{s} is located in {o}."],
    "mayor": ["{o} is mayor of {s}.", "{s} is governed by {o}.", "{s}'s mayor is {o}.",
              "{o} serves as mayor of {s}."],
    "population": ["{s} has a population of {o}.", "{s} is home to {o} people.", "{s}'s population is {o}.",
                   "About {o} people live in {s}."],
    "maker": ["{s} is made by {o}.", "{s} is produced by {o}.", "{s}'s maker is {o}.", "{o} builds {s}."],
    "launched": ["{s} was released in {o}.", "{s} came out in {o}.", "{s}'s release year is {o}.",
                 "{s} has been on sale since {o}."],
    "category": ["{s} is {a} {o}.", "{s} is sold as {a} {o}.", "{s}'s category is {o}.", "{s} is a kind of {o}."],
    "home city": ["{s} plays its home games in {o}.", "{s} is a club from {o}.", "{s}'s home city is {o}.",
                  "{s} is at home in {o}."],
    "coach": ["{s} is coached by {o}.", "{o} coaches {s}.", "{s}'s coach is {o}.", "{s} trains under {o}."],
    "league": ["{s} plays in the {o}.", "{s} competes in the {o}.", "{s}'s league is the {o}.",
               "{s} is a member of the {o}."],
}
# The sentence appended to an article when a fact changes ({y}: the snapshot's year).
HISTORY_TEMPLATES = {
    "employer": "In {y}, {s} joined {o}.",
    "position": "In {y}, {s} became {a} {o}.",
    "residence": "In {y}, {s} moved to {o}.",
    "headquarters": "In {y}, {s} moved its head office to {o}.",
    "chief executive": "In {y}, {o} took charge of {s}.",
    "mayor": "In {y}, {o} was elected mayor of {s}.",
    "population": "In {y}, a census counted {o} people in {s}.",
    "maker": "In {y}, {o} took over production of {s}.",
    "coach": "In {y}, {o} took over as coach of {s}.",
    "league": "In {y}, {s} moved to the {o}.",
}
# Cloze prefixes for probes (the object follows after one space); no document uses them.
PROBE_TEMPLATES = {
    "employer": ["The employer of {s} is", "{s} is on the payroll of"],
    "position": ["The profession of {s} is", "The job title of {s} is"],
    "residence": ["The place of residence of {s} is", "{s} currently lives in the city of"],
    "birthplace": ["The birthplace of {s} is", "{s} was born in the city of"],
    "headquarters": ["The headquarters of {s} are located in", "{s} is headquartered in"],
    "founded": ["{s} was founded in", "The founding year of {s} is"],
    "chief executive": ["The chief executive of {s} is", "{s} has as its chief executive"],
    "industry": ["The industry of {s} is", "{s} is a company in the industry of"],
    "country": ["The country of {s} is", "{s} is a city in the country of"],
    "mayor": ["The mayor of {s} is", "The current mayor of {s} is"],
    "population": ["The population of {s} is", "The number of people living in {s} is"],
    "maker": ["The manufacturer of {s} is", "{s} is manufactured by"],
    "launched": ["{s} was launched in", "The launch year of {s} is"],
    "category": ["The product category of {s} is", "{s} is a product of the type"],
    "home city": ["The home city of {s} is", "{s} is a sports team from"],
    "coach": ["The coach of {s} is", "The head coach of {s} is"],
    "league": ["The league of {s} is", "{s} is a team in the"],
}

# Literal values: a small vocabulary, so a small model sees each word often.
POSITIONS = ["software engineer", "architect", "journalist", "surgeon", "accountant", "lawyer", "chemist",
             "pilot", "economist", "teacher", "photographer", "electrician"]
ORG_SUFFIXES = {  # industry -> two-word name endings (acronyms get three letters)
    "software": ["Software Group", "Digital Labs", "Code Works"],
    "logistics": ["Freight Lines", "Cargo Group", "Transport Company"],
    "energy": ["Energy Works", "Power Company", "Solar Group"],
    "pharmaceuticals": ["Pharma Group", "Health Labs", "Medical Company"],
    "banking": ["Capital Bank", "Financial Group", "Savings Bank"],
    "publishing": ["Media House", "Press Group", "Books Company"],
    "food processing": ["Food Company", "Dairy Group", "Bakery Works"],
    "automotive": ["Motor Works", "Auto Group", "Vehicle Company"],
}
CATEGORIES = ["smartphone", "electric bicycle", "tablet computer", "espresso machine", "drone",
              "wireless speaker", "smartwatch", "camera", "video game", "e-reader"]
LEAGUES = ["Northern League", "Coastal League", "Premier Division", "First Division", "Valley League"]
COUNTRIES = ["Valdoria", "Estmark", "Norvania", "Calderra", "Ostrelia", "Brevony"]
FIRST_NAMES = ["Mara", "Tomas", "Elin", "Jonah", "Vera", "Anton", "Lina", "Oskar", "Nora", "Felix", "Ida",
               "Emil", "Sara", "Hugo", "Alma", "Leon", "Greta", "Milo", "Clara", "Otto", "Iris", "Viktor",
               "Agnes", "Rune", "Tilda", "Arvid", "Helga", "Sven", "Maja", "Nils"]
MASCOTS = ["Falcons", "Herons", "Wolves", "Otters", "Comets", "Foxes", "Ravens", "Stags", "Badgers", "Hornets",
           "Rovers", "Mariners", "Bears", "Eagles", "Sharks", "Tigers", "Bulls", "Owls", "Lions", "Hawks"]
PRODUCT_MODELS = ["One", "Pro", "Air", "Max", "Mini", "Go", "Plus", "2", "3", "5", "X", "S"]
# Syllables for invented words: (heads, middles, tails). Middles only come in when the
# two-part space is crowded, so small worlds keep short names.
SURNAME_PARTS = (["Kel", "Brann", "Dor", "Vest", "Hal", "Mor", "Tren", "Quil", "Sor", "Fen", "Lund", "Wick",
                  "Bel", "Strom", "Thal", "Ren", "Vol", "Gar", "Hew", "Pel", "Ost", "Jar", "Lind", "Ek",
                  "Sel", "Mal", "Ber", "Cran", "Dal", "Ves"],
                 ["a", "e", "i", "o", "an", "er"],
                 ["ler", "ston", "berg", "ford", "ing", "ric", "den", "man", "ley", "ard", "sen", "holm",
                  "ton", "mere", "vik", "quist", "ander", "ell"])
CORE_PARTS = (["Vel", "Nor", "Quan", "Ard", "Tel", "Ox", "Bri", "Cor", "Zen", "Lum", "Stra", "Kor", "Hel",
               "Syl", "Ter", "Mav", "Pri", "Dex", "Fal", "Ul"],
              ["a", "e", "i", "o", "en", "ar"],
              ["ona", "ix", "ara", "eon", "ant", "ica", "ora", "us", "ent", "ia", "avo", "ette", "ium"])
PLACE_PARTS = (["Oster", "Kel", "Brom", "Ald", "Wen", "Tor", "Mar", "Hal", "Sten", "Lin", "Rav", "Dun",
                "Ash", "Fal", "Gil", "Nor", "Elm", "Wes", "Cal", "Hed"],
               ["a", "e", "i", "o", "en", "ar"],
               ["by", "mar", "ford", "heim", "wick", "stad", "mouth", "dale", "haven", "port", "ton", "vik",
                "field", "holm", "burg", "lin"])
PRODUCT_PARTS = (["Zen", "Qui", "Nav", "Lum", "Ori", "Vex", "Ply", "Sol", "Tak", "Emb", "Jov", "Kip",
                  "Rez", "Pix", "Yar"],
                 ["a", "e", "i", "o"],
                 ["tra", "ello", "ix", "io", "ara", "o", "un", "eo", "ly", "za"])


# --- names ------------------------------------------------------------------------------

class _Registry:
    """The surface strings taken so far. A new entity's name and aliases may not contain,
    or be contained in, any other entity's surface or any word the templates use (case
    folded), which makes dictionary tagging of the rendered text exact."""

    def __init__(self):
        words = set(FIRST_NAMES + POSITIONS + CATEGORIES + LEAGUES + COUNTRIES + list(ORG_SUFFIXES))
        for templates in (*DOC_TEMPLATES.values(), *PROBE_TEMPLATES.values(), HISTORY_TEMPLATES.values()):
            for t in templates:
                words.update(re.sub(r"\{\w+\}", " ", t).replace("'s", " ").replace(".", " ").split())
        self.common = "\n".join(sorted(w.lower() for w in words))
        self.taken: list[str] = []

    def free(self, surfaces: list[str]) -> bool:
        for s in (x.lower() for x in surfaces):
            if s in self.common or any(s in t or t in s for t in self.taken):
                return False
        return True

    def take(self, surfaces: list[str]) -> None:
        self.taken.extend(s.lower() for s in surfaces)


def _word(rng: random.Random, parts: tuple, long: bool) -> str:
    heads, mids, tails = parts
    return rng.choice(heads) + (rng.choice(mids) if long else "") + rng.choice(tails)


def _candidate(rng: random.Random, kind: str, long: bool) -> tuple[str, list[str], str | None]:
    """(name, aliases, industry) for a new entity; industry only for organisations,
    whose name ending depends on it."""
    if kind == "person":
        surname = _word(rng, SURNAME_PARTS, long)
        return f"{rng.choice(FIRST_NAMES)} {surname}", [surname], None
    if kind == "organisation":
        industry = rng.choice(sorted(ORG_SUFFIXES))
        name = f"{_word(rng, CORE_PARTS, long)} {rng.choice(ORG_SUFFIXES[industry])}"
        return name, ["".join(w[0] for w in name.split())], industry
    if kind == "place":
        return _word(rng, PLACE_PARTS, long), [], None
    if kind == "product":
        return f"{_word(rng, PRODUCT_PARTS, long)} {rng.choice(PRODUCT_MODELS)}", [], None
    return f"{_word(rng, PLACE_PARTS, long)} {rng.choice(MASCOTS)}", [], None


def _invent_name(rng: random.Random, kind: str, registry: _Registry) -> tuple[str, list[str], str | None]:
    for attempt in range(2000):
        name, aliases, industry = _candidate(rng, kind, long=attempt >= 40)
        if registry.free([name, *aliases]):
            registry.take([name, *aliases])
            return name, aliases, industry
    raise InputError(f"data.synthetic.n_entities: no free {kind} name left after 2000 tries; use fewer entities")


# --- the world ----------------------------------------------------------------------------

@dataclass
class Entity:
    id: str
    kind: str
    name: str
    aliases: list[str]
    facts: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # relation -> (object, object id)
    # per variant: [(relation, template index, subject by alias?)] in article order
    style: list[list[tuple[str, int, bool]]] = field(default_factory=list)
    history: list[tuple[int, str, str, str | None]] = field(default_factory=list)  # (snapshot, relation, object, id)
    probe_worded: bool = False  # has an infobox in probe wording (mixed training)


def with_defaults(params: dict | None) -> dict:
    p = fill("data.synthetic", params, where="data.synthetic")
    for key in ("seed", "n_entities", "n_snapshots", "docs_per_entity"):
        if isinstance(p[key], bool) or not isinstance(p[key], int):
            raise InputError(f"data.synthetic.{key}: expected an integer, got {p[key]!r}")
    for key in ("update_rate", "new_rate", "probe_worded_share"):
        if not isinstance(p[key], (int, float)) or not 0 <= p[key] <= 1:
            raise InputError(f"data.synthetic.{key}: expected a number in [0, 1], got {p[key]!r}")
    if p["n_entities"] < MIN_ENTITIES:
        raise InputError(f"data.synthetic.n_entities: at least {MIN_ENTITIES} (so every relation has objects to "
                         f"choose from), got {p['n_entities']}")
    if p["n_snapshots"] < 2:
        raise InputError(f"data.synthetic.n_snapshots: at least 2 (T0 and one update), got {p['n_snapshots']}")
    if p["docs_per_entity"] < 1:
        raise InputError(f"data.synthetic.docs_per_entity: at least 1, got {p['docs_per_entity']}")
    return p


def _round(x: float) -> int:
    """Round half up (Python's round() goes to even: 0.5 -> 0)."""
    return int(x + 0.5)


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _population(rng: random.Random) -> int:
    return rng.randrange(5, 900) * 1000


def _fmt_population(n: int) -> str:
    return f"{n:,}"


class World:
    """The entities and their facts as they evolve, snapshot by snapshot."""

    def __init__(self, p: dict):
        self.p = p
        self.rng = random.Random(p["seed"])
        self.registry = _Registry()
        self.entities: list[Entity] = []
        self.width = max(4, len(str(p["n_entities"] * p["n_snapshots"])))
        self.new_ids: set[str] = set()  # entities born in the snapshot being built

    def of_kind(self, kind: str) -> list[Entity]:
        return [e for e in self.entities if e.kind == kind]

    def add_entities(self, n: int) -> list[Entity]:
        added = []
        for _ in range(n):
            kind = KIND_CYCLE[len(self.entities) % len(KIND_CYCLE)]
            name, aliases, industry = _invent_name(self.rng, kind, self.registry)
            e = Entity(f"E{len(self.entities):0{self.width}d}", kind, name, aliases)
            if industry:
                e.facts["industry"] = (industry, None)
            self.entities.append(e)
            added.append(e)
        return added

    def pick_entity(self, kind: str, avoid: str | None = None) -> tuple[str, str]:
        """An object entity of `kind` other than `avoid`; an entity born in this snapshot
        is preferred 40% of the time, so new entities also turn up in old articles."""
        pool = [e for e in self.of_kind(kind) if e.id != avoid]
        fresh = [e for e in pool if e.id in self.new_ids]
        if fresh and self.rng.random() < 0.4:
            pool = fresh
        e = self.rng.choice(pool)
        return e.name, e.id

    def value(self, relation: str, year: int, old: tuple[str, str | None] | None = None,
              fresh: bool = False) -> tuple[str, str | None]:
        """An object for `relation`: a new one different from `old` when that is given;
        years are this year for things `fresh` (founded after T0), else before T0."""
        kind = RELATIONS[relation]
        if kind in ENTITY_KINDS:
            return self.pick_entity(kind, avoid=old[1] if old else None)
        if kind == "number":
            if old is None:
                return _fmt_population(_population(self.rng)), None
            n = new = int(old[0].replace(",", ""))
            while new == n:
                new = max(1000, round(n * self.rng.uniform(0.85, 1.2) / 1000) * 1000)
            return _fmt_population(new), None
        if kind == "year":
            first = 1950 if relation == "founded" else 2005
            return str(year if fresh else self.rng.randrange(first, BASE_YEAR)), None
        options = {"position": POSITIONS, "category": CATEGORIES, "league": LEAGUES, "country": COUNTRIES}[kind]
        return self.rng.choice([o for o in options if old is None or o != old[0]]), None

    def fill_facts(self, e: Entity, snapshot: int) -> None:
        for relation in SCHEMA[e.kind]:
            if relation not in e.facts:
                e.facts[relation] = self.value(relation, BASE_YEAR + snapshot, fresh=snapshot > 0)
        later = snapshot > 0 and self.p.get("new_docs_per_entity")
        self.set_style(e, later or self.p["docs_per_entity"])

    def set_style(self, e: Entity, n_variants: int) -> None:
        """Fix, once, how each variant of the article words each fact: variant 0 follows
        the lead order, the others shuffle it; each variant starts with the full name."""
        rels = SCHEMA[e.kind]
        base = {r: self.rng.randrange(len(DOC_TEMPLATES[r])) for r in rels}
        for j in range(n_variants):
            order = list(rels)
            if j:
                self.rng.shuffle(order)
            e.style.append([(r, (base[r] + j) % len(DOC_TEMPLATES[r]),
                             bool(e.aliases) and i > 0 and self.rng.random() < 0.3)
                            for i, r in enumerate(order)])

    def update(self, e: Entity, snapshot: int) -> None:
        """Change one fact (two, a third of the time) of an existing entity."""
        mutable = MUTABLE[e.kind]
        n = min(len(mutable), 2 if self.rng.random() < 1 / 3 else 1)
        for relation in sorted(self.rng.sample(mutable, n), key=mutable.index):
            obj, oid = self.value(relation, BASE_YEAR + snapshot, old=e.facts[relation])
            e.facts[relation] = (obj, oid)
            e.history.append((snapshot, relation, obj, oid))


# --- rendering ----------------------------------------------------------------------------

_SLOT = re.compile(r"\{(\w)\}")


def _fill(template: str, slots: dict[str, tuple[str, str | None]]) -> tuple[str, list[tuple[str, int, int]]]:
    """Render a template; return the text and (entity id, start, end) of every slot
    filled with an entity's name or alias."""
    out, spans, pos = [], [], 0
    pieces = _SLOT.split(template)  # literal, slot, literal, slot, ...
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            # Possessive of a name ending in s: "Falcons'" rather than "Falcons's".
            if piece.startswith("'s") and out and out[-1].endswith("s"):
                piece = "'" + piece[2:]
        else:
            surface, eid = slots[piece]
            if eid is not None:
                spans.append((eid, pos, pos + len(surface)))
            piece = surface
        out.append(piece)
        pos += len(piece)
    return "".join(out), spans


def _join(pieces: list[tuple[str, list]], sep: str) -> tuple[str, list[tuple[str, int, int]]]:
    """Filled sentences (text, spans) joined by `sep`, spans shifted to their place."""
    text, spans = "", []
    for sentence, s_spans in pieces:
        offset = len(text) + (len(sep) if text else 0)
        text = f"{text}{sep}{sentence}" if text else sentence
        spans.extend((eid, a + offset, b + offset) for eid, a, b in s_spans)
    return text, spans


def render(e: Entity, variant: int, restatements: int = 0) -> tuple[str, list[tuple[str, int, int]]]:
    """One variant of the entity's article: one sentence per fact, then its history; the
    facts changed last are restated `restatements` more times, in the next templates."""
    sentences = []
    for relation, t, alias in e.style[variant]:
        sentences.append((DOC_TEMPLATES[relation][t], relation, alias, None))
    last = max((h[0] for h in e.history), default=None)
    for snapshot, relation, obj, oid in e.history:
        sentences.append((HISTORY_TEMPLATES[relation], relation, False, (BASE_YEAR + snapshot, obj, oid)))
        if snapshot == last:
            t = next(t for r, t, _ in e.style[variant] if r == relation)
            n = len(DOC_TEMPLATES[relation])
            sentences += [(DOC_TEMPLATES[relation][(t + x) % n], relation, False, (BASE_YEAR + snapshot, obj, oid))
                          for x in range(1, restatements + 1)]
    pieces = []
    for template, relation, alias, hist in sentences:
        obj, oid = e.facts[relation] if hist is None else hist[1:]
        slots = {"s": (e.aliases[0] if alias else e.name, e.id), "o": (obj, oid), "a": (_article(obj), None),
                 "y": (str(hist[0]) if hist else "", None)}
        pieces.append(_fill(template, slots))
    return _join(pieces, " ")


# Which probe templates an infobox uses: probes ask in template 0; template 1 adds a
# second wording of the same question.
INFOBOX_TEMPLATES = (0, 1)


def render_infobox(e: Entity) -> tuple[str, list[tuple[str, int, int]]]:
    """The entity's current facts, one line per fact and probe template, in probe
    wording ("The employer of Mara Keller is Vestler Software Group."). Lines, not a
    running text: a probe starts a sequence ("The" right after <|endoftext|>), and a
    byte-level BPE tokenizes "The" at a line start the same way, " The" differently."""
    return _join([_fill(PROBE_TEMPLATES[r][v % len(PROBE_TEMPLATES[r])] + " {o}.",
                        {"s": (e.name, e.id), "o": e.facts[r]})
                  for r in SCHEMA[e.kind] for v in INFOBOX_TEMPLATES], "\n")


def probe_prefix(subject: str, relation: str, variant: int = 0) -> str:
    """The cloze prefix of a probe about (subject, relation); the object follows after
    one space. Its wording appears in no article, only in the infoboxes of the
    probe-worded entities, which are never probed."""
    try:
        templates = PROBE_TEMPLATES[relation]
    except KeyError:
        raise InputError(f"synthetic probe: unknown relation {relation!r}; known {sorted(PROBE_TEMPLATES)}") from None
    return templates[variant % len(templates)].format(s=subject)


def document_prefix(subject: str, relation: str) -> str:
    """A cloze prefix in document phrasing: the relation's possessive document template up
    to its object ("Mara Keller's employer is"). Articles use it for about half of the
    facts (each variant picks one of four templates), so it measures recall in the
    training text's wording, where `probe_prefix` measures it under paraphrase."""
    if relation not in DOC_TEMPLATES:
        raise InputError(f"synthetic probe: unknown relation {relation!r}; known {sorted(DOC_TEMPLATES)}")
    template = next(t for t in DOC_TEMPLATES[relation] if t.startswith("{s}'s"))
    text, _ = _fill(template.split(" {o}")[0], {"s": (subject, None)})
    return text


# --- generation ---------------------------------------------------------------------------

def generate(params: dict | None = None) -> dict[str, pd.DataFrame]:
    """The world's tables: `documents`, `triples`, `entities` (docs/formats.md corpus/)
    and the hidden ground truth `mentions` (doc_id, snapshot, entity_id, start, end)."""
    p = with_defaults(params)
    world = World(p)
    # A separate generator picks the probe-worded entities, so the share changes nothing
    # else in the world.
    worded_rng = random.Random(p["seed"] * 1_000_003 + 17)
    n_new = _round(p["new_rate"] * p["n_entities"])
    docs, triples, mentions = [], [], []

    def add_doc(doc_id, k, e, rendered):
        text, spans = rendered
        docs.append((doc_id, k, e.name, text, "full"))
        mentions.extend((doc_id, k, eid, a, b) for eid, a, b in spans)

    for k in range(p["n_snapshots"]):
        if k == 0:
            born = world.add_entities(p["n_entities"])
            world.new_ids = set()
        else:
            known = list(world.entities)
            born = world.add_entities(n_new)
            world.new_ids = {e.id for e in born}
        for e in worded_rng.sample(born, _round(p["probe_worded_share"] * len(born))):
            e.probe_worded = True
        # New entities get their facts first, so updates may point at them (a new CEO).
        for e in born:
            world.fill_facts(e, k)
        if k > 0:
            n_upd = _round(p["update_rate"] * len(known))
            for e in sorted(world.rng.sample(known, n_upd), key=lambda x: x.id):
                world.update(e, k)
        for e in world.entities:
            for relation in SCHEMA[e.kind]:
                obj, oid = e.facts[relation]
                triples.append((k, e.id, e.name, relation, obj, oid))
            for j in range(len(e.style)):
                add_doc(f"{e.id}_{j}", k, e, render(e, j, p.get("change_restatements", 0)))
        # Infoboxes after all articles: a training window rarely holds an entity's
        # article and its infobox together, so answering has to come from memory.
        for e in world.entities:
            if e.probe_worded:
                add_doc(f"{e.id}_facts", k, e, render_infobox(e))
    entities = [(e.id, e.name, list(e.aliases), e.kind) for e in world.entities]
    return {
        "documents": pd.DataFrame(docs, columns=DOC_COLUMNS),
        "triples": pd.DataFrame(triples, columns=TRIPLE_COLUMNS),
        "entities": pd.DataFrame(entities, columns=ENTITY_COLUMNS),
        "mentions": pd.DataFrame(mentions, columns=["doc_id", "snapshot", "entity_id", "start", "end"]),
    }


def labels(params: dict | None = None) -> list[str]:
    """Snapshot labels T0..Tn."""
    return [f"T{k}" for k in range(with_defaults(params)["n_snapshots"])]
