"""Synthetic simultaneous translation: a lexicon bijection, noun-first reordering and particle lookahead."""

from __future__ import annotations

import random
from collections.abc import Sequence

from brisklm.errors import BriskError, VocabularyError
from brisklm.tasks.base import Example, Task, sorted_vocab

SOURCE_NOUNS = ("kel", "mibo", "tanu", "lopi", "neka", "pime", "kato", "milu", "seno", "tabi",
                "lenu", "mopa", "kilo", "nepi", "tome", "pala", "keto", "lima", "nolu", "pite")
TARGET_NOUNS = ("drak", "flun", "grem", "hrot", "jask", "klim", "mont", "prug", "stov", "trel",
                "vask", "wrin", "zeld", "brom", "chel", "dunt", "fisk", "gorl", "hask", "jorn")
SOURCE_ADJECTIVES = ("ama", "eli", "ino", "oka", "ule", "ipa", "oru", "ena", "ito", "aki", "epo", "ula")
TARGET_ADJECTIVES = ("sly", "brev", "crin", "dolt", "frim", "glav", "harn", "jelt", "krom", "lurn", "mirk", "nolt")
SOURCE_VERBS = ("sefa", "dori", "garu", "belo", "fimo", "hane", "jaku", "rive", "vode", "wila")
TARGET_VERBS = ("pask", "quen", "rald", "smit", "tov", "ulk", "vorn", "wesk", "yarl", "zunt")
# Each ambiguous word has two senses; the first particle within LOOKAHEAD_WINDOW later words picks one.
AMBIGUOUS = {"baku": ("barn", "bisk"), "zoti": ("zorn", "zelk"), "yema": ("yurt", "yelm"), "quro": ("qualt", "quist")}
PARTICLES = ("po", "ri")  # po -> first sense, ri -> second sense; particles have no translation
LOOKAHEAD_WINDOW = 3
MAX_LENGTH = 64

LEXICON: dict[str, str] = {
    **dict(zip(SOURCE_NOUNS, TARGET_NOUNS)),
    **dict(zip(SOURCE_ADJECTIVES, TARGET_ADJECTIVES)),
    **dict(zip(SOURCE_VERBS, TARGET_VERBS)),
}
SOURCE_WORDS = sorted_vocab(SOURCE_NOUNS, SOURCE_ADJECTIVES, SOURCE_VERBS, AMBIGUOUS, PARTICLES)
TARGET_WORDS = sorted_vocab(TARGET_NOUNS, TARGET_ADJECTIVES, TARGET_VERBS, *AMBIGUOUS.values())
_NOUNS, _ADJS = frozenset(SOURCE_NOUNS), frozenset(SOURCE_ADJECTIVES)
assert not set(SOURCE_WORDS) & set(TARGET_WORDS), "source and target vocabularies must be disjoint"
assert len(set(LEXICON.values())) == len(LEXICON), "the lexicon must be a bijection"


def _sense(source_words: Sequence[str], i: int) -> tuple[str, int]:
    """Translate the ambiguous word at i and return it with the source prefix length that decides it."""
    n = len(source_words)
    for j in range(i + 1, min(i + 1 + LOOKAHEAD_WINDOW, n)):
        if source_words[j] in PARTICLES:
            return AMBIGUOUS[source_words[i]][PARTICLES.index(source_words[j])], j + 1
    return AMBIGUOUS[source_words[i]][0], min(i + 1 + LOOKAHEAD_WINDOW, n)


def align(source_words: Sequence[str]) -> list[tuple[str, int]]:
    """Oracle: each target word with the number of source words that must be read before it is determined."""
    unknown = [w for w in source_words if w not in SOURCE_WORDS]
    if unknown:
        raise VocabularyError(f"unknown source word(s) {unknown[:5]}: use words from translation.SOURCE_WORDS")
    out: list[tuple[str, int]] = []
    n, i = len(source_words), 0
    while i < n:
        word = source_words[i]
        if word in _ADJS:
            j = i
            while j < n and source_words[j] in _ADJS:
                j += 1
            adjectives = [LEXICON[w] for w in source_words[i:j]]
            if j < n and source_words[j] in _NOUNS:
                out += [(w, j + 1) for w in [LEXICON[source_words[j]], *adjectives]]
                i = j + 1
            else:  # stray adjectives with no noun: kept in place once the run is known to end
                out += [(w, min(j + 1, n)) for w in adjectives]
                i = j
            continue
        if word in AMBIGUOUS:
            out.append(_sense(source_words, i))
        elif word not in PARTICLES:
            out.append((LEXICON[word], i + 1))
        i += 1
    needed, best = [], 0
    for target, k in out:  # output is monotone: a word cannot be written before its predecessors
        best = max(best, k)
        needed.append((target, best))
    return needed


def translate(source_words: Sequence[str]) -> list[str]:
    """Oracle reference translation: deterministic target words for a source word list."""
    return [word for word, _ in align(source_words)]


class TranslationTask(Task):
    """Source sentences of noun phrases, verbs and particle-resolved ambiguous words, with oracle targets."""

    name = "translation"

    def __init__(self, min_len: int = 6, max_len: int = 20, variable_lookahead: bool = False,
                 max_adjectives: int | None = None, max_particle_distance: int = LOOKAHEAD_WINDOW) -> None:
        """Configure sentence length (source words) and how much lookahead the reordering/particles need."""
        if not 1 <= min_len <= max_len <= MAX_LENGTH:
            raise BriskError(f"need 1 <= min_len <= max_len <= {MAX_LENGTH}, got {min_len}, {max_len}: fix the lengths")
        if max_adjectives is None:
            max_adjectives = 3 if variable_lookahead else 1
        if not 0 <= max_adjectives <= 3:
            raise BriskError(f"max_adjectives must be in 0..3, got {max_adjectives}: noun phrases have 1-4 words")
        if not 1 <= max_particle_distance <= LOOKAHEAD_WINDOW:
            raise BriskError(f"max_particle_distance must be in 1..{LOOKAHEAD_WINDOW}, got {max_particle_distance}")
        self.min_len, self.max_len = min_len, max_len
        self.variable_lookahead = variable_lookahead
        self.max_adjectives, self.max_particle_distance = max_adjectives, max_particle_distance

    def vocabulary(self) -> list[str]:
        """Source and target words (disjoint sets)."""
        return sorted_vocab(SOURCE_WORDS, TARGET_WORDS)

    def _chunk(self, rng: random.Random, room: int) -> list[str]:
        """One phrase of at most room words: a noun phrase, a verb, or an ambiguous word with its particle."""
        kind = rng.choices(("np", "verb", "amb"), weights=(0.45, 0.3, 0.25))[0]
        if kind == "amb" and room >= 2:
            distance = rng.randint(1, min(self.max_particle_distance, room - 1))
            fillers = [rng.choice(SOURCE_NOUNS + SOURCE_VERBS) for _ in range(distance - 1)]
            return [rng.choice(tuple(AMBIGUOUS)), *fillers, rng.choice(PARTICLES)]
        if kind == "verb":
            return [rng.choice(SOURCE_VERBS)]
        n_adj = rng.randint(0, min(self.max_adjectives, room - 1))
        return [rng.choice(SOURCE_ADJECTIVES) for _ in range(n_adj)] + [rng.choice(SOURCE_NOUNS)]

    def generate(self, rng: random.Random) -> Example:
        """Draw a source sentence of the configured length and its oracle translation."""
        length = rng.randint(self.min_len, self.max_len)
        source: list[str] = []
        while len(source) < length:
            source += self._chunk(rng, length - len(source))
        aligned = align(source)
        target = [w for w, _ in aligned]
        meta = {"source_words": source, "target_words": target, "source_needed": [k for _, k in aligned]}
        text = " ".join(target)
        return Example(prompt=" ".join(source), completion=text, answer=text, meta=meta)
