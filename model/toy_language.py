"""A toy English -> Spanish-like language: lexicon, grammar, parser, sampler and data splits.

The module reads like a small grammar book:

1. Grammatical categories and the lexicon entries (dataclasses), with the morphology that inflects them.
2. The lexicon itself: nouns with gender, adjectives, verbs with full conjugation tables, pronouns,
   determiners, numerals one..twenty, prepositions and conjunctions.
3. The syntax tree of a sentence.
4. The renderer, which turns a tree into an English sentence, its Spanish-like translation and the gold
   word alignment between them.  This is where the "rules of translation" live: adjectives follow their
   noun, object pronouns move before the verb, "do/does/did/will not" collapse into "no", articles and
   adjectives agree with the noun, verbs agree with their subject, "de el"/"a el" contract.
5. A deterministic recursive-descent parser from English words back to the tree, so that `translate`
   handles any sentence the grammar can produce and names the first word it cannot handle.  `translate`
   takes text as people type it: capitals, final marks, commas before a clause's conjunction, contractions,
   names and numbers in digits (copied), several sentences; it cuts text into tokens with the rules the
   model's input and output go through (`service.core.text`).
6. A random sampler of trees, whose depth is controlled by `SamplerConfig`, and of how a person types them.
7. Fixed train / valid / test / user / names / long splits.

The target follows Latin American usage: plural "you" (only reachable through coordination such as
"you and he") is "ustedes", which agrees like the third person plural, so verb paradigms have five cells
(yo, tú, él/ella, nosotros, ellos/ustedes).  English "you" is always singular "tú"; "we"/"they"/"them"
take the masculine forms; subject "it" is dropped as Spanish does, its verb carrying the alignment.

Why the grammar is deterministic to parse (every construction is marked by its words):

* a noun phrase always starts with a determiner or numeral and has at most one post-modifier: a
  prepositional phrase (starts with a preposition) or a relative clause (starts with "that"/"who");
* a relative clause whose next word is a verb has a subject gap ("the dog that sees me"); otherwise it
  has an object gap ("the dog that i see") and ends right after its verb;
* noun phrases coordinate ("and"/"or") only as the subject or object of a top-level clause, never inside
  a prepositional phrase or relative clause, so an "and" there always closes the inner constituent;
* an "and"/"or" after a top-level object starts a new clause exactly when a subject and a verb follow;
  the sampler only coordinates objects in the last clause, so that reading is never wrong;
* a prepositional phrase after the verb exists only when the verb has no noun-phrase object, so it can
  never be confused with a modifier of that object.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from enum import Enum
from functools import cache

from service.core.text import (
    MARKS,
    OPENING,
    SENTENCE_ENDS,
    apply_case,
    is_number,
    join_tokens,
    normal_word,
    sentence_case,
    sentence_spans,
    split_words,
)

__all__ = [
    "ADJECTIVES", "CONJUNCTIONS", "DEFAULT_SAMPLER", "DEFAULT_SPLIT_SIZES", "DETERMINERS", "LONG_MAX_WORDS",
    "LONG_SAMPLER", "NOUNS", "NUMERALS", "PREPOSITIONS", "PRONOUNS", "SPLIT_SEEDS", "TRAIN_MAX_WORDS",
    "VERBS",
    "Adjective", "Agreement", "Clause", "Conjunction", "Coordination", "Determiner", "Gender", "GrammarError",
    "Kind", "Noun", "NounPhrase", "Number", "Numeral", "Pair", "PrepositionalPhrase", "Preposition",
    "Pronoun", "RelativeClause", "SamplerConfig", "Sentence", "Tense", "Valency", "Verb", "VerbPhrase",
    "generate_split", "lexicon_words", "parse", "render", "sample_pair", "sample_sentence", "sample_tree",
    "translate",
]


class GrammarError(ValueError):
    """The input is not a sentence of the toy grammar; the message names the first offending word."""


@dataclass(frozen=True)
class Pair:
    source: str  # English, space-separated lowercase words
    target: str  # Spanish-like, space-separated lowercase words
    alignment: tuple[tuple[int, ...], ...]  # alignment[j]: indices of the source words behind target word j


# ---------------------------------------------------------------------------------------------------------
# 1. Grammatical categories and lexicon entries
# ---------------------------------------------------------------------------------------------------------


class Gender(Enum):
    MASCULINE = "m"
    FEMININE = "f"


class Number(Enum):
    SINGULAR = "sg"
    PLURAL = "pl"


class Tense(Enum):
    PRESENT = "present"
    PAST = "past"
    FUTURE = "future"


class Valency(Enum):
    TRANSITIVE = "transitive"  # needs an object: "i see her"
    INTRANSITIVE = "intransitive"  # never takes one: "i run"
    OPTIONAL = "optional"  # either: "i eat", "i eat the apple"


class Kind(Enum):
    """What a noun denotes.  Only the sampler cares: persons and animals make plausible subjects, and
    only persons are introduced by "who"."""

    PERSON = "person"
    ANIMAL = "animal"
    THING = "thing"


_M, _F = Gender.MASCULINE, Gender.FEMININE
_SG, _PL = Number.SINGULAR, Number.PLURAL
_VOWELS = "aeiouáéíóú"


@dataclass(frozen=True, slots=True)
class Agreement:
    """Person and number of a subject, which the verb copies."""

    person: int  # 1, 2 or 3; (2, plural) never occurs: "ustedes" agrees as (3, plural)
    number: Number

    @property
    def cell(self) -> int:
        """Index into a five-cell Spanish paradigm: yo, tú, él/ella, nosotros, ellos/ustedes."""
        if self.number is _SG:
            return self.person - 1
        return 3 if self.person == 1 else 4

    @property
    def third_singular(self) -> bool:
        """English marks only this cell of the present tense ("sees", "does")."""
        return self.person == 3 and self.number is _SG


_FIRST_SG, _SECOND_SG, _THIRD_SG = Agreement(1, _SG), Agreement(2, _SG), Agreement(3, _SG)
_FIRST_PL, _THIRD_PL = Agreement(1, _PL), Agreement(3, _PL)


def _cell(gender: Gender, number: Number) -> int:
    """Index into four-cell nominal paradigms: masculine singular, feminine singular, masc. pl., fem. pl."""
    return (0 if gender is _M else 1) + (0 if number is _SG else 2)


@dataclass(frozen=True, slots=True)
class Noun:
    english: str
    english_plural: str
    spanish: str
    spanish_plural: str
    gender: Gender
    kind: Kind

    def english_form(self, number: Number) -> str:
        return self.english if number is _SG else self.english_plural

    def spanish_form(self, number: Number) -> str:
        return self.spanish if number is _SG else self.spanish_plural


@dataclass(frozen=True, slots=True)
class Adjective:
    english: str
    forms: tuple[str, str, str, str]  # Spanish, indexed by _cell(gender, number)


@dataclass(frozen=True, slots=True)
class Verb:
    english: str  # base form: "see"
    english_third: str  # present, third person singular: "sees"
    english_past: str  # "saw"
    spanish: str  # infinitive, for reference: "ver"
    valency: Valency
    present: tuple[str, ...]  # five cells each, indexed by Agreement.cell
    preterite: tuple[str, ...]
    future: tuple[str, ...]

    def english_form(self, tense: Tense, agreement: Agreement) -> str:
        """The finite English form when no auxiliary is used (present or past)."""
        if tense is Tense.PAST:
            return self.english_past
        return self.english_third if agreement.third_singular else self.english

    def spanish_form(self, tense: Tense, agreement: Agreement) -> str:
        if tense is Tense.PRESENT:
            return self.present[agreement.cell]
        return (self.preterite if tense is Tense.PAST else self.future)[agreement.cell]


@dataclass(frozen=True, slots=True)
class Determiner:
    english: str
    english_before_vowel: str | None  # "an" for "a": chosen by the sound of the next word
    number: Number | None  # the only number it combines with, or None for both
    forms: tuple[str, str, str, str]  # Spanish, indexed by _cell; "" where the number is impossible
    takes_numeral: bool  # "the two dogs", "my three cats", but not "every two dogs"


@dataclass(frozen=True, slots=True)
class Numeral:
    english: str
    value: int
    forms: tuple[str, str]  # masculine, feminine (only "one" differs: un / una)

    @property
    def number(self) -> Number:
        return _SG if self.value == 1 and self.english in ("one", "1") else _PL


def _digits_numeral(word: str) -> Numeral:
    """A number written in digits: copied into the target; only "1" is singular ("1 dog", "3 dogs")."""
    return Numeral(word, int(word), (word, word))


@dataclass(frozen=True, slots=True)
class Name:
    """A proper name ("Maria"): a noun phrase of its own, third person singular, copied unchanged."""

    word: str


@dataclass(frozen=True, slots=True)
class Preposition:
    english: str
    spanish: tuple[str, ...]  # some are two words: "near" -> "cerca de"


@dataclass(frozen=True, slots=True)
class Pronoun:
    english: str  # subject form: "he"
    english_object: str  # "him"
    spanish: str | None  # subject form "él"; None when Spanish drops it ("it")
    spanish_object: str  # the clitic placed before the verb: "lo"
    agreement: Agreement
    coordinable: bool  # "the dog and i" is fine, "the dog and it" is not generated


@dataclass(frozen=True, slots=True)
class Conjunction:
    english: str
    spanish: str
    joins_noun_phrases: bool  # "but" joins only clauses


# ---------------------------------------------------------------------------------------------------------
# Morphology: regular inflection, so that the lexicon lists only what is irregular
# ---------------------------------------------------------------------------------------------------------


def _english_plural(noun: str) -> str:
    if noun.endswith(("s", "sh", "ch", "x", "z")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in _VOWELS:
        return noun[:-1] + "ies"
    return noun + "s"


def _english_third(verb: str) -> str:
    if verb.endswith(("s", "sh", "ch", "x", "z", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2] not in _VOWELS:
        return verb[:-1] + "ies"
    return verb + "s"


def _english_past(verb: str) -> str:
    if verb.endswith("e"):
        return verb + "d"
    if verb.endswith("y") and verb[-2] not in _VOWELS:
        return verb[:-1] + "ied"
    return verb + "ed"


# Adding a syllable moves the stress, so a final stressed syllable loses its written accent: ratón -> ratones.
_UNACCENT = str.maketrans("áéíóú", "aeiou")


def _spanish_plural(word: str) -> str:
    if word[-1] in _VOWELS:
        return word + "s"
    if word.endswith("z"):
        return word[:-1] + "ces"
    if word[-1] in "ns" and len(word) > 1 and word[-2] in "áéíóú":
        return word[:-2] + word[-2].translate(_UNACCENT) + word[-1] + "es"
    return word + "es"


_PRESENT_ENDINGS = {
    "ar": ("o", "as", "a", "amos", "an"),
    "er": ("o", "es", "e", "emos", "en"),
    "ir": ("o", "es", "e", "imos", "en"),
}
_PRETERITE_ENDINGS = {
    "ar": ("é", "aste", "ó", "amos", "aron"),
    "er": ("í", "iste", "ió", "imos", "ieron"),
    "ir": ("í", "iste", "ió", "imos", "ieron"),
}
_FUTURE_ENDINGS = ("é", "ás", "á", "emos", "án")
# Before the "é" of the preterite yo-form, c/g/z change spelling to keep their sound: toqué, llegué, abracé.
_PRETERITE_SPELLING = {"c": "qu", "g": "gu", "z": "c"}


def _conjugate(infinitive: str, present: tuple[str, ...] | None, preterite: tuple[str, ...] | None,
               future_stem: str | None) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    stem, conjugation = infinitive[:-2], infinitive[-2:]
    if present is None:
        present = tuple(stem + ending for ending in _PRESENT_ENDINGS[conjugation])
    if preterite is None:
        cells = [stem + ending for ending in _PRETERITE_ENDINGS[conjugation]]
        if conjugation == "ar" and stem[-1] in _PRETERITE_SPELLING:
            cells[0] = stem[:-1] + _PRETERITE_SPELLING[stem[-1]] + "é"
        preterite = tuple(cells)
    future = tuple((future_stem or infinitive) + ending for ending in _FUTURE_ENDINGS)
    for table in (present, preterite):
        if len(table) != 5:
            raise ValueError(f"{infinitive}: paradigms have five cells (yo, tú, él, nosotros, ellos)")
    return present, preterite, future


# ---------------------------------------------------------------------------------------------------------
# 2. The lexicon
# ---------------------------------------------------------------------------------------------------------


def _noun(english: str, spanish: str, gender: Gender, kind: Kind, *, plural: str | None = None,
          spanish_plural: str | None = None) -> Noun:
    return Noun(english, plural or _english_plural(english), spanish,
                spanish_plural or _spanish_plural(spanish), gender, kind)


def _adjective(english: str, spanish: str, *, plural: str | None = None) -> Adjective:
    if spanish.endswith("o"):  # rojo, roja, rojos, rojas
        stem = spanish[:-1]
        return Adjective(english, (spanish, stem + "a", spanish + "s", stem + "as"))
    plural = plural or _spanish_plural(spanish)  # grande / grandes, azul / azules: no gender
    return Adjective(english, (spanish, spanish, plural, plural))


def _verb(english: str, spanish: str, valency: Valency, *, third: str | None = None, past: str | None = None,
          present: str | None = None, preterite: str | None = None, future_stem: str | None = None) -> Verb:
    tables = _conjugate(spanish, tuple(present.split()) if present else None,
                        tuple(preterite.split()) if preterite else None, future_stem)
    return Verb(english, third or _english_third(english), past or _english_past(english), spanish, valency,
                *tables)


_PERSON, _ANIMAL, _THING = Kind.PERSON, Kind.ANIMAL, Kind.THING

NOUNS: tuple[Noun, ...] = (
    # persons
    _noun("man", "hombre", _M, _PERSON, plural="men"),
    _noun("woman", "mujer", _F, _PERSON, plural="women"),
    _noun("child", "niño", _M, _PERSON, plural="children"),
    _noun("person", "persona", _F, _PERSON, plural="people"),
    _noun("boy", "chico", _M, _PERSON),
    _noun("girl", "chica", _F, _PERSON),
    _noun("baby", "bebé", _M, _PERSON),
    _noun("teacher", "maestro", _M, _PERSON),
    _noun("doctor", "médico", _M, _PERSON),
    _noun("friend", "amigo", _M, _PERSON),
    _noun("brother", "hermano", _M, _PERSON),
    _noun("sister", "hermana", _F, _PERSON),
    _noun("mother", "madre", _F, _PERSON),
    _noun("father", "padre", _M, _PERSON),
    _noun("uncle", "tío", _M, _PERSON),
    _noun("aunt", "tía", _F, _PERSON),
    _noun("king", "rey", _M, _PERSON),
    _noun("queen", "reina", _F, _PERSON),
    _noun("princess", "princesa", _F, _PERSON),
    _noun("student", "estudiante", _M, _PERSON),
    _noun("farmer", "granjero", _M, _PERSON),
    _noun("neighbor", "vecino", _M, _PERSON),
    _noun("soldier", "soldado", _M, _PERSON),
    _noun("nurse", "enfermera", _F, _PERSON),
    # animals
    _noun("dog", "perro", _M, _ANIMAL),
    _noun("cat", "gato", _M, _ANIMAL),
    _noun("bird", "pájaro", _M, _ANIMAL),
    _noun("horse", "caballo", _M, _ANIMAL),
    _noun("cow", "vaca", _F, _ANIMAL),
    _noun("mouse", "ratón", _M, _ANIMAL, plural="mice"),
    _noun("wolf", "lobo", _M, _ANIMAL, plural="wolves"),
    _noun("rabbit", "conejo", _M, _ANIMAL),
    _noun("duck", "pato", _M, _ANIMAL),
    _noun("chicken", "gallina", _F, _ANIMAL),
    _noun("bear", "oso", _M, _ANIMAL),
    _noun("frog", "rana", _F, _ANIMAL),
    _noun("snake", "serpiente", _F, _ANIMAL),
    _noun("lion", "león", _M, _ANIMAL),
    _noun("tiger", "tigre", _M, _ANIMAL),
    _noun("spider", "araña", _F, _ANIMAL),
    _noun("bee", "abeja", _F, _ANIMAL),
    _noun("goat", "cabra", _F, _ANIMAL),
    _noun("elephant", "elefante", _M, _ANIMAL),
    _noun("owl", "búho", _M, _ANIMAL),
    _noun("ant", "hormiga", _F, _ANIMAL),
    _noun("monkey", "mono", _M, _ANIMAL),
    _noun("pig", "cerdo", _M, _ANIMAL),
    _noun("turtle", "tortuga", _F, _ANIMAL),
    _noun("fox", "zorro", _M, _ANIMAL),
    _noun("donkey", "burro", _M, _ANIMAL),
    # things
    _noun("table", "mesa", _F, _THING),
    _noun("chair", "silla", _F, _THING),
    _noun("book", "libro", _M, _THING),
    _noun("house", "casa", _F, _THING),
    _noun("car", "coche", _M, _THING),
    _noun("door", "puerta", _F, _THING),
    _noun("window", "ventana", _F, _THING),
    _noun("key", "llave", _F, _THING),
    _noun("apple", "manzana", _F, _THING),
    _noun("orange", "naranja", _F, _THING),
    _noun("egg", "huevo", _M, _THING),
    _noun("cake", "pastel", _M, _THING),
    _noun("box", "caja", _F, _THING),
    _noun("cup", "taza", _F, _THING),
    _noun("bottle", "botella", _F, _THING),
    _noun("letter", "carta", _F, _THING),
    _noun("picture", "cuadro", _M, _THING),
    _noun("phone", "teléfono", _M, _THING),
    _noun("pencil", "lápiz", _M, _THING),
    _noun("bag", "bolsa", _F, _THING),
    _noun("umbrella", "paraguas", _M, _THING, spanish_plural="paraguas"),
    _noun("clock", "reloj", _M, _THING),
    _noun("lamp", "lámpara", _F, _THING),
    _noun("mirror", "espejo", _M, _THING),
    _noun("knife", "cuchillo", _M, _THING, plural="knives"),
    _noun("ball", "pelota", _F, _THING),
    _noun("shoe", "zapato", _M, _THING),
    _noun("hat", "sombrero", _M, _THING),
    _noun("shirt", "camisa", _F, _THING),
    _noun("bed", "cama", _F, _THING),
    _noun("song", "canción", _F, _THING),
    _noun("map", "mapa", _M, _THING),
    _noun("hand", "mano", _F, _THING),
    _noun("boat", "barco", _M, _THING),
    _noun("train", "tren", _M, _THING),
    _noun("bicycle", "bicicleta", _F, _THING),
    _noun("kitchen", "cocina", _F, _THING),
    _noun("school", "escuela", _F, _THING),
    _noun("park", "parque", _M, _THING),
    _noun("garden", "jardín", _M, _THING),
    _noun("street", "calle", _F, _THING),
    _noun("road", "camino", _M, _THING),
    _noun("bridge", "puente", _M, _THING),
    _noun("city", "ciudad", _F, _THING),
    _noun("river", "río", _M, _THING),
    _noun("mountain", "montaña", _F, _THING),
    _noun("forest", "bosque", _M, _THING),
    _noun("beach", "playa", _F, _THING),
    _noun("island", "isla", _F, _THING),
    _noun("tree", "árbol", _M, _THING),
    _noun("flower", "flor", _F, _THING),
    _noun("leaf", "hoja", _F, _THING, plural="leaves"),
    _noun("moon", "luna", _F, _THING),
    _noun("star", "estrella", _F, _THING),
)

ADJECTIVES: tuple[Adjective, ...] = (
    _adjective("big", "grande"),
    _adjective("small", "pequeño"),
    _adjective("tall", "alto"),
    _adjective("short", "bajo"),
    _adjective("long", "largo"),
    _adjective("heavy", "pesado"),
    _adjective("red", "rojo"),
    _adjective("blue", "azul"),
    _adjective("green", "verde"),
    _adjective("black", "negro"),
    _adjective("white", "blanco"),
    _adjective("yellow", "amarillo"),
    _adjective("gray", "gris"),
    _adjective("brown", "marrón"),
    _adjective("old", "viejo"),
    _adjective("young", "joven", plural="jóvenes"),  # the plural gains a written accent
    _adjective("new", "nuevo"),
    _adjective("happy", "feliz"),
    _adjective("sad", "triste"),
    _adjective("beautiful", "hermoso"),
    _adjective("pretty", "bonito"),
    _adjective("ugly", "feo"),
    _adjective("fast", "rápido"),
    _adjective("slow", "lento"),
    _adjective("good", "bueno"),
    _adjective("bad", "malo"),
    _adjective("hungry", "hambriento"),
    _adjective("tired", "cansado"),
    _adjective("angry", "enojado"),
    _adjective("brave", "valiente"),
    _adjective("smart", "listo"),
    _adjective("strong", "fuerte"),
    _adjective("weak", "débil"),
    _adjective("rich", "rico"),
    _adjective("poor", "pobre"),
    _adjective("quiet", "tranquilo"),
    _adjective("loud", "ruidoso"),
    _adjective("funny", "gracioso"),
    _adjective("kind", "amable"),
    _adjective("lazy", "perezoso"),
    _adjective("busy", "ocupado"),
    _adjective("famous", "famoso"),
    _adjective("strange", "extraño"),
    _adjective("dirty", "sucio"),
    _adjective("cold", "frío"),
    _adjective("hot", "caliente"),
)

_T, _I, _O = Valency.TRANSITIVE, Valency.INTRANSITIVE, Valency.OPTIONAL

VERBS: tuple[Verb, ...] = (
    # transitive, or optionally so
    _verb("see", "ver", _T, past="saw", present="veo ves ve vemos ven",
          preterite="vi viste vio vimos vieron"),
    _verb("eat", "comer", _O, past="ate"),
    _verb("drink", "beber", _O, past="drank"),
    _verb("write", "escribir", _O, past="wrote"),
    _verb("love", "amar", _T),
    _verb("want", "querer", _T, present="quiero quieres quiere queremos quieren",
          preterite="quise quisiste quiso quisimos quisieron", future_stem="querr"),
    _verb("have", "tener", _T, third="has", past="had", present="tengo tienes tiene tenemos tienen",
          preterite="tuve tuviste tuvo tuvimos tuvieron", future_stem="tendr"),
    _verb("find", "encontrar", _T, past="found",
          present="encuentro encuentras encuentra encontramos encuentran"),
    _verb("buy", "comprar", _T, past="bought"),
    _verb("sell", "vender", _T, past="sold"),
    _verb("open", "abrir", _T),
    _verb("close", "cerrar", _T, present="cierro cierras cierra cerramos cierran"),
    _verb("carry", "llevar", _T),
    _verb("help", "ayudar", _T),
    _verb("call", "llamar", _T),
    _verb("visit", "visitar", _T),
    _verb("watch", "mirar", _T),
    _verb("hear", "oír", _T, past="heard", present="oigo oyes oye oímos oyen",
          preterite="oí oíste oyó oímos oyeron", future_stem="oir"),
    _verb("know", "conocer", _T, past="knew", present="conozco conoces conoce conocemos conocen"),
    _verb("paint", "pintar", _O),
    _verb("wash", "lavar", _T),
    _verb("clean", "limpiar", _T),
    _verb("break", "romper", _T, past="broke"),
    _verb("catch", "atrapar", _T, past="caught"),
    _verb("follow", "seguir", _T, present="sigo sigues sigue seguimos siguen",
          preterite="seguí seguiste siguió seguimos siguieron"),
    _verb("bring", "traer", _T, past="brought", present="traigo traes trae traemos traen",
          preterite="traje trajiste trajo trajimos trajeron"),
    _verb("need", "necesitar", _T),
    _verb("push", "empujar", _T),
    _verb("teach", "enseñar", _O, past="taught"),
    _verb("touch", "tocar", _T),
    _verb("take", "tomar", _T, past="took"),
    _verb("forget", "olvidar", _T, past="forgot"),
    _verb("draw", "dibujar", _O, past="drew"),
    _verb("kiss", "besar", _T),
    _verb("hug", "abrazar", _T, past="hugged"),
    _verb("greet", "saludar", _T),
    _verb("hate", "odiar", _T),
    _verb("make", "hacer", _T, past="made", present="hago haces hace hacemos hacen",
          preterite="hice hiciste hizo hicimos hicieron", future_stem="har"),
    _verb("build", "construir", _T, past="built",
          present="construyo construyes construye construimos construyen",
          preterite="construí construiste construyó construimos construyeron"),
    _verb("move", "mover", _T, present="muevo mueves mueve movemos mueven"),
    _verb("remember", "recordar", _O, present="recuerdo recuerdas recuerda recordamos recuerdan"),
    _verb("hide", "esconder", _T, past="hid"),
    _verb("learn", "aprender", _O),
    _verb("understand", "entender", _O, past="understood",
          present="entiendo entiendes entiende entendemos entienden"),
    _verb("win", "ganar", _O, past="won"),
    _verb("lose", "perder", _O, past="lost", present="pierdo pierdes pierde perdemos pierden"),
    _verb("sing", "cantar", _O, past="sang"),
    _verb("study", "estudiar", _O),
    _verb("climb", "subir", _O),
    # intransitive
    _verb("run", "correr", _I, past="ran"),
    _verb("sleep", "dormir", _I, past="slept", present="duermo duermes duerme dormimos duermen",
          preterite="dormí dormiste durmió dormimos durmieron"),
    _verb("walk", "caminar", _I),
    _verb("swim", "nadar", _I, past="swam"),
    _verb("dance", "bailar", _I),
    _verb("arrive", "llegar", _I),
    _verb("cry", "llorar", _I),
    _verb("jump", "saltar", _I),
    _verb("work", "trabajar", _I),
    _verb("live", "vivir", _I),
    _verb("travel", "viajar", _I),
    _verb("wait", "esperar", _I),
    _verb("fall", "caer", _I, past="fell", present="caigo caes cae caemos caen",
          preterite="caí caíste cayó caímos cayeron"),
    _verb("come", "venir", _I, past="came", present="vengo vienes viene venimos vienen",
          preterite="vine viniste vino vinimos vinieron", future_stem="vendr"),
    _verb("go", "ir", _I, past="went", present="voy vas va vamos van",
          preterite="fui fuiste fue fuimos fueron"),
    _verb("smile", "sonreír", _I, present="sonrío sonríes sonríe sonreímos sonríen",
          preterite="sonreí sonreíste sonrió sonreímos sonrieron", future_stem="sonreir"),
    _verb("shout", "gritar", _I),
    _verb("fly", "volar", _I, past="flew", present="vuelo vuelas vuela volamos vuelan"),
    _verb("speak", "hablar", _I, past="spoke"),
)

PRONOUNS: tuple[Pronoun, ...] = (
    Pronoun("i", "me", "yo", "me", _FIRST_SG, coordinable=True),
    Pronoun("you", "you", "tú", "te", _SECOND_SG, coordinable=True),
    Pronoun("he", "him", "él", "lo", _THIRD_SG, coordinable=True),
    Pronoun("she", "her", "ella", "la", _THIRD_SG, coordinable=True),
    Pronoun("it", "it", None, "lo", _THIRD_SG, coordinable=False),
    Pronoun("we", "us", "nosotros", "nos", _FIRST_PL, coordinable=True),
    Pronoun("they", "them", "ellos", "los", _THIRD_PL, coordinable=True),
)

DETERMINERS: tuple[Determiner, ...] = (
    Determiner("the", None, None, ("el", "la", "los", "las"), takes_numeral=True),
    Determiner("a", "an", _SG, ("un", "una", "", ""), takes_numeral=False),
    Determiner("some", None, _PL, ("", "", "algunos", "algunas"), takes_numeral=False),
    Determiner("many", None, _PL, ("", "", "muchos", "muchas"), takes_numeral=False),
    Determiner("every", None, _SG, ("cada", "cada", "", ""), takes_numeral=False),
    Determiner("this", None, _SG, ("este", "esta", "", ""), takes_numeral=False),
    Determiner("these", None, _PL, ("", "", "estos", "estas"), takes_numeral=True),
    Determiner("those", None, _PL, ("", "", "esos", "esas"), takes_numeral=True),
    Determiner("my", None, None, ("mi", "mi", "mis", "mis"), takes_numeral=True),
    Determiner("your", None, None, ("tu", "tu", "tus", "tus"), takes_numeral=True),
    Determiner("his", None, None, ("su", "su", "sus", "sus"), takes_numeral=True),
    Determiner("her", None, None, ("su", "su", "sus", "sus"), takes_numeral=True),
    Determiner("our", None, None, ("nuestro", "nuestra", "nuestros", "nuestras"), takes_numeral=True),
    Determiner("their", None, None, ("su", "su", "sus", "sus"), takes_numeral=True),
)

_NUMBER_WORDS = (
    ("one", "un"), ("two", "dos"), ("three", "tres"), ("four", "cuatro"), ("five", "cinco"),
    ("six", "seis"), ("seven", "siete"), ("eight", "ocho"), ("nine", "nueve"), ("ten", "diez"),
    ("eleven", "once"), ("twelve", "doce"), ("thirteen", "trece"), ("fourteen", "catorce"),
    ("fifteen", "quince"), ("sixteen", "dieciséis"), ("seventeen", "diecisiete"), ("eighteen", "dieciocho"),
    ("nineteen", "diecinueve"), ("twenty", "veinte"),
)
NUMERALS: tuple[Numeral, ...] = tuple(
    Numeral(english, value, (spanish, "una" if value == 1 else spanish))  # only "one" has a feminine
    for value, (english, spanish) in enumerate(_NUMBER_WORDS, start=1)
)

PREPOSITIONS: tuple[Preposition, ...] = (
    Preposition("with", ("con",)),
    Preposition("without", ("sin",)),
    Preposition("in", ("en",)),
    Preposition("on", ("sobre",)),
    Preposition("under", ("debajo", "de")),
    Preposition("near", ("cerca", "de")),
    Preposition("behind", ("detrás", "de")),
    Preposition("inside", ("dentro", "de")),
    Preposition("from", ("de",)),
    Preposition("of", ("de",)),
    Preposition("to", ("a",)),
    Preposition("for", ("para",)),
    Preposition("towards", ("hacia",)),
    Preposition("through", ("por",)),
)

CONJUNCTIONS: tuple[Conjunction, ...] = (
    Conjunction("and", "y", joins_noun_phrases=True),
    Conjunction("or", "o", joins_noun_phrases=True),
    Conjunction("but", "pero", joins_noun_phrases=False),
)

# Function words that are not lexicon entries: they are absorbed by the translation of other words.
_AUXILIARIES: dict[str, Tense] = {"do": Tense.PRESENT, "does": Tense.PRESENT, "did": Tense.PAST,
                                  "will": Tense.FUTURE}
_NOT = "not"
_RELATIVE_PRONOUNS = ("that", "who")
_RELATIVE_SPANISH = "que"
_NEGATION_SPANISH = "no"
# "de el" and "a el" are always written as one word.
_CONTRACTIONS = {"de": "del", "a": "al"}


def _spanish_conjunction(conjunction: str, following: str) -> str:
    """"y" becomes "e" before an /i/ sound and "o" becomes "u" before an /o/ sound: "u ocho", "e iré"."""
    if conjunction == "y" and (following[0] in "ií"
                               or (following.startswith("hi") and following[2:3] not in _VOWELS)):
        return "e"
    if conjunction == "o" and (following[0] in "oó" or following.startswith(("ho", "hó"))):
        return "u"
    return conjunction


# ---------------------------------------------------------------------------------------------------------
# Lookup tables for the parser, checked once: every English word must belong to one category, except the
# three words whose category the position decides (subject/object "you" and "it"; object "her" versus
# possessive "her", told apart by the next word).
# ---------------------------------------------------------------------------------------------------------

_BASE, _THIRD, _PAST = "base", "third", "past"

_NOUN_FORMS: dict[str, tuple[Noun, Number]] = {}
_ADJECTIVE_WORDS: dict[str, Adjective] = {}
_VERB_FORMS: dict[str, tuple[Verb, str]] = {}
_DETERMINER_WORDS: dict[str, Determiner] = {}
_NUMERAL_WORDS: dict[str, Numeral] = {}
_PREPOSITION_WORDS: dict[str, Preposition] = {}
_SUBJECT_PRONOUNS: dict[str, Pronoun] = {}
_OBJECT_PRONOUNS: dict[str, Pronoun] = {}
_CONJUNCTION_WORDS: dict[str, Conjunction] = {}


def _build_tables() -> None:
    categories: dict[str, list[str]] = {}

    def add(table: dict, word: str, value: object, category: str) -> None:
        if word in table:
            raise RuntimeError(f"toy lexicon: '{word}' is listed twice as a {category}")
        table[word] = value
        categories.setdefault(word, []).append(category)

    for noun in NOUNS:
        add(_NOUN_FORMS, noun.english, (noun, _SG), "noun")
        add(_NOUN_FORMS, noun.english_plural, (noun, _PL), "noun")
    for adjective in ADJECTIVES:
        add(_ADJECTIVE_WORDS, adjective.english, adjective, "adjective")
    for verb in VERBS:
        # A form shared by two slots ("read", "put") would make the tense ambiguous: not allowed.
        for form, slot in ((verb.english, _BASE), (verb.english_third, _THIRD), (verb.english_past, _PAST)):
            add(_VERB_FORMS, form, (verb, slot), "verb")
    for determiner in DETERMINERS:
        add(_DETERMINER_WORDS, determiner.english, determiner, "determiner")
        if determiner.english_before_vowel:
            add(_DETERMINER_WORDS, determiner.english_before_vowel, determiner, "determiner")
    for numeral in NUMERALS:
        add(_NUMERAL_WORDS, numeral.english, numeral, "numeral")
    for preposition in PREPOSITIONS:
        add(_PREPOSITION_WORDS, preposition.english, preposition, "preposition")
    for pronoun in PRONOUNS:
        add(_SUBJECT_PRONOUNS, pronoun.english, pronoun, "subject pronoun")
        add(_OBJECT_PRONOUNS, pronoun.english_object, pronoun, "object pronoun")
    for conjunction in CONJUNCTIONS:
        add(_CONJUNCTION_WORDS, conjunction.english, conjunction, "conjunction")
    for word in (*_AUXILIARIES, _NOT, *_RELATIVE_PRONOUNS):
        categories.setdefault(word, []).append("function word")

    allowed = {"you": ["subject pronoun", "object pronoun"], "it": ["subject pronoun", "object pronoun"],
               "her": ["determiner", "object pronoun"]}
    for word, found in categories.items():
        if len(found) > 1 and sorted(found) != sorted(allowed.get(word, [])):
            raise RuntimeError(f"toy lexicon: '{word}' is ambiguous ({', '.join(found)})")


_build_tables()
_ENGLISH_WORDS: frozenset[str] = frozenset(
    [*_NOUN_FORMS, *_ADJECTIVE_WORDS, *_VERB_FORMS, *_DETERMINER_WORDS, *_NUMERAL_WORDS, *_PREPOSITION_WORDS,
     *_SUBJECT_PRONOUNS, *_OBJECT_PRONOUNS, *_CONJUNCTION_WORDS, *_AUXILIARIES, _NOT, *_RELATIVE_PRONOUNS]
)
_THE = _DETERMINER_WORDS["the"]
_AND, _OR = _CONJUNCTION_WORDS["and"], _CONJUNCTION_WORDS["or"]


def _numeral(word: str) -> Numeral | None:
    """A numeral word ("three") or a number in digits ("3")."""
    numeral = _NUMERAL_WORDS.get(word)
    if numeral is None and is_number(word):
        return _digits_numeral(word)
    return numeral


def _is_name(word: str) -> bool:
    """The parser sees names as typed and every other word in lowercase."""
    normal = normal_word(word)
    return word[:1].isupper() and normal not in _ENGLISH_WORDS and normal not in _CONTRACTED_NEGATIONS


# ---------------------------------------------------------------------------------------------------------
# 3. The syntax tree
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NounPhrase:
    determiner: Determiner | None  # at least one of determiner / numeral is present
    numeral: Numeral | None
    adjectives: tuple[Adjective, ...]
    noun: Noun
    number: Number
    modifier: PrepositionalPhrase | RelativeClause | None = None  # at most one post-modifier


@dataclass(frozen=True, slots=True)
class Coordination:
    conjunction: Conjunction
    items: tuple[NounPhrase | Pronoun | Name, ...]  # two or more; pronouns only in subjects


@dataclass(frozen=True, slots=True)
class PrepositionalPhrase:
    preposition: Preposition
    object: NounPhrase | Name


@dataclass(frozen=True, slots=True)
class VerbPhrase:
    verb: Verb
    tense: Tense
    negated: bool
    object: NounPhrase | Pronoun | Coordination | Name | None = None
    adjunct: PrepositionalPhrase | None = None  # only when the object is not a (coordinated) noun phrase


@dataclass(frozen=True, slots=True)
class RelativeClause:
    pronoun: str  # "that" or "who"; both become "que"
    subject: NounPhrase | Pronoun | Name | None  # None: the antecedent is the subject ("the dog that sees
    # me")
    predicate: VerbPhrase  # has no object when `subject` is given: the antecedent is the object


@dataclass(frozen=True, slots=True)
class Clause:
    subject: NounPhrase | Pronoun | Coordination | Name
    predicate: VerbPhrase


@dataclass(frozen=True, slots=True)
class Sentence:
    clauses: tuple[Clause, ...]
    conjunctions: tuple[Conjunction, ...]  # one fewer than clauses


def _agreement(subject: NounPhrase | Pronoun | Coordination | Name) -> Agreement:
    if isinstance(subject, Name):
        return _THIRD_SG
    if isinstance(subject, NounPhrase):
        return _THIRD_SG if subject.number is _SG else _THIRD_PL
    if isinstance(subject, Pronoun):
        return subject.agreement
    if subject.conjunction is not _AND:
        # "or" agrees with the nearest conjunct, in English ("the dog or the cats run") as in the target.
        return _agreement(subject.items[-1])
    # "and" makes a plural; the speaker counts first ("the dog and i" = we), then the rest is
    # third person ("you and he" = ustedes, which agrees like ellos).
    if any(_agreement(item).person == 1 for item in subject.items):
        return _FIRST_PL
    return _THIRD_PL


# ---------------------------------------------------------------------------------------------------------
# 4. Rendering: tree -> English words, target words and their alignment
# ---------------------------------------------------------------------------------------------------------

_Token = tuple[str, tuple[int, ...]]  # a target word and the source positions it comes from


class _Renderer:
    """Walks the tree in English word order, so each English word gets its position as it is emitted;
    every constituent returns its target words, which the caller may reorder."""

    __slots__ = ("clause_joins", "source")

    def __init__(self) -> None:
        self.source: list[str] = []
        self.clause_joins: list[int] = []  # positions of the conjunctions that join clauses (commas go there)

    def emit(self, word: str) -> int:
        self.source.append(word)
        return len(self.source) - 1

    def sentence(self, sentence: Sentence) -> list[_Token]:
        out = self.clause(sentence.clauses[0])
        for conjunction, clause in zip(sentence.conjunctions, sentence.clauses[1:], strict=True):
            position = self.emit(conjunction.english)
            self.clause_joins.append(position)
            self._join(out, conjunction, position, self.clause(clause))
        return out

    @staticmethod
    def _join(out: list[_Token], conjunction: Conjunction, position: int, following: list[_Token]) -> None:
        out.append((_spanish_conjunction(conjunction.spanish, following[0][0]), (position,)))
        out.extend(following)

    def clause(self, clause: Clause) -> list[_Token]:
        subject = clause.subject
        dropped = None
        if isinstance(subject, Pronoun):
            position = self.emit(subject.english)
            if subject.spanish is None:  # "it sees me" -> "me ve": the verb stands for the subject
                dropped, out = position, []
            else:
                out = [(subject.spanish, (position,))]
        elif isinstance(subject, NounPhrase | Name):
            out = self.noun_phrase(subject)
        else:
            out = self.coordination(subject)
        out.extend(self.verb_phrase(clause.predicate, _agreement(subject), dropped))
        return out

    def coordination(self, coordination: Coordination) -> list[_Token]:
        out = self.conjunct(coordination.items[0])
        for item in coordination.items[1:]:
            position = self.emit(coordination.conjunction.english)
            self._join(out, coordination.conjunction, position, self.conjunct(item))
        return out

    def conjunct(self, item: NounPhrase | Pronoun | Name) -> list[_Token]:
        if isinstance(item, NounPhrase | Name):
            return self.noun_phrase(item)
        return [(item.spanish or "", (self.emit(item.english),))]  # coordinated pronouns are never "it"

    def verb_phrase(self, phrase: VerbPhrase, agreement: Agreement,
                    dropped_subject: int | None) -> list[_Token]:
        verb, tense = phrase.verb, phrase.tense
        out: list[_Token] = []
        auxiliary = None
        if phrase.negated:
            if tense is Tense.PRESENT:
                word = "does" if agreement.third_singular else "do"
            else:
                word = "did" if tense is Tense.PAST else "will"
            auxiliary = self.emit(word)
            out.append((_NEGATION_SPANISH, (auxiliary, self.emit(_NOT))))
            head = self.emit(verb.english)
        elif tense is Tense.FUTURE:
            auxiliary = self.emit("will")
            head = self.emit(verb.english)
        else:
            head = self.emit(verb.english_form(tense, agreement))
        # The Spanish verb carries the tense that "will"/"did" express, and the person of a dropped "it";
        # "do"/"does" carry nothing the verb needs, so only "no" points at them.
        sources = [head]
        if auxiliary is not None and tense is not Tense.PRESENT:
            sources.append(auxiliary)
        if dropped_subject is not None:
            sources.append(dropped_subject)
        spanish_verb = (verb.spanish_form(tense, agreement), tuple(sorted(sources)))

        obj = phrase.object
        if isinstance(obj, Pronoun):  # clitics go before the verb, after "no": "yo no la veo"
            out.append((obj.spanish_object, (self.emit(obj.english_object),)))
            out.append(spanish_verb)
        else:
            out.append(spanish_verb)
            if isinstance(obj, NounPhrase | Name):
                out.extend(self.noun_phrase(obj))
            elif obj is not None:
                out.extend(self.coordination(obj))
        if phrase.adjunct is not None:
            out.extend(self.prepositional_phrase(phrase.adjunct))
        return out

    def noun_phrase(self, phrase: NounPhrase | Name) -> list[_Token]:
        if isinstance(phrase, Name):
            return [(phrase.word, (self.emit(phrase.word),))]
        noun, number = phrase.noun, phrase.number
        cell = _cell(noun.gender, number)
        out: list[_Token] = []
        determiner = phrase.determiner
        if determiner is not None:
            word = determiner.english
            if determiner.english_before_vowel is not None:
                following = phrase.adjectives[0].english if phrase.adjectives else noun.english_form(number)
                if following[0] in _VOWELS:
                    word = determiner.english_before_vowel
            out.append((determiner.forms[cell], (self.emit(word),)))
        if phrase.numeral is not None:
            out.append((phrase.numeral.forms[cell & 1], (self.emit(phrase.numeral.english),)))
        # Adjectives follow the noun in the target, in their English order: "el perro grande rojo".
        adjectives = [(adjective.forms[cell], (self.emit(adjective.english),))
                      for adjective in phrase.adjectives]
        out.append((noun.spanish_form(number), (self.emit(noun.english_form(number)),)))
        out.extend(adjectives)
        modifier = phrase.modifier
        if isinstance(modifier, PrepositionalPhrase):
            out.extend(self.prepositional_phrase(modifier))
        elif modifier is not None:
            out.extend(self.relative_clause(modifier, _THIRD_SG if number is _SG else _THIRD_PL))
        return out

    def prepositional_phrase(self, phrase: PrepositionalPhrase) -> list[_Token]:
        position = self.emit(phrase.preposition.english)
        out: list[_Token] = [(word, (position,)) for word in phrase.preposition.spanish]
        following = self.noun_phrase(phrase.object)
        first, sources = following[0]
        contracted = _CONTRACTIONS.get(out[-1][0])
        if contracted is not None and first == "el":  # "de el" -> "del": one word from "of the"
            out[-1] = (contracted, (position, *sources))
            following = following[1:]
        out.extend(following)
        return out

    def relative_clause(self, clause: RelativeClause, antecedent: Agreement) -> list[_Token]:
        out: list[_Token] = [(_RELATIVE_SPANISH, (self.emit(clause.pronoun),))]
        subject = clause.subject
        if subject is None:
            out.extend(self.verb_phrase(clause.predicate, antecedent, None))
            return out
        dropped = None
        if isinstance(subject, Pronoun):
            position = self.emit(subject.english)
            if subject.spanish is None:
                dropped = position
            else:
                out.append((subject.spanish, (position,)))
        else:
            out.extend(self.noun_phrase(subject))
        out.extend(self.verb_phrase(clause.predicate, _agreement(subject), dropped))
        return out


def render(sentence: Sentence) -> Pair:
    """The English sentence, its reference translation and the gold alignment of a syntax tree."""
    renderer = _Renderer()
    tokens = renderer.sentence(sentence)
    return Pair(" ".join(renderer.source), " ".join(word for word, _ in tokens),
                tuple(sources for _, sources in tokens))


# ---------------------------------------------------------------------------------------------------------
# 5. Parsing: English words -> tree
# ---------------------------------------------------------------------------------------------------------


class _Parser:
    """Recursive descent with one word of lookahead, plus one bounded look-ahead parse to tell a
    coordinated object from a coordinated clause ("i see the dog and the cat [runs]")."""

    def __init__(self, words: list[str]) -> None:
        self.words = words
        self.pos = 0

    # -- helpers ------------------------------------------------------------------------------------------

    def peek(self, ahead: int = 0) -> str | None:
        index = self.pos + ahead
        return self.words[index] if index < len(self.words) else None

    def found(self) -> str:
        word = self.peek()
        return "the sentence ended" if word is None else f"found '{word}'"

    def text(self, start: int) -> str:
        return " ".join(self.words[start:self.pos])

    def _possessive_her(self) -> bool:
        """"her" is a determiner when a noun phrase continues after it ("her big dog"), else a pronoun."""
        following = self.peek(1)
        return (following in _NOUN_FORMS or following in _ADJECTIVE_WORDS
                or _numeral(following or "") is not None)

    def _starts_object(self) -> bool:
        word = self.peek() or ""
        return (word in _OBJECT_PRONOUNS or word in _DETERMINER_WORDS or _numeral(word) is not None
                or _is_name(word))

    def noun_or_name(self) -> NounPhrase | Name:
        word = self.peek() or ""
        if _is_name(word):
            self.pos += 1
            return Name(word)
        return self.noun_phrase()

    # -- sentences and clauses ----------------------------------------------------------------------------

    def sentence(self) -> Sentence:
        clauses = [self.clause()]
        conjunctions = []
        while (conjunction := _CONJUNCTION_WORDS.get(self.peek() or "")) is not None:
            self.pos += 1
            conjunctions.append(conjunction)
            clauses.append(self.clause())
        if self.pos < len(self.words):
            raise GrammarError(f"unexpected word '{self.peek()}' at position {self.pos} after the complete "
                               f"clause '{self.text(0)}'")
        return Sentence(tuple(clauses), tuple(conjunctions))

    def clause(self) -> Clause:
        start = self.pos
        subject = self.subject()
        return Clause(subject, self.verb_phrase(_agreement(subject), start, top_level=True))

    def subject(self) -> NounPhrase | Pronoun | Coordination | Name:
        start = self.pos
        first = self.nominal()
        word = self.peek()
        if word != "and" and word != "or":
            return first
        conjunction = _CONJUNCTION_WORDS[word]
        items = [first]
        positions = [start]
        while self.peek() == conjunction.english:
            self.pos += 1
            positions.append(self.pos)
            items.append(self.nominal())
        other = self.peek()
        if other in ("and", "or"):
            raise GrammarError(f"cannot mix '{conjunction.english}' and '{other}' in one coordination "
                               f"(position {self.pos})")
        for item, position in zip(items, positions, strict=True):
            if isinstance(item, Pronoun) and not item.coordinable:
                raise GrammarError(f"'{item.english}' at position {position} cannot be part of a "
                                   "coordination")
        return Coordination(conjunction, tuple(items))

    def nominal(self) -> NounPhrase | Pronoun | Name:
        """A single subject: a subject pronoun, a name or a noun phrase."""
        word = self.peek()
        if _is_name(word or ""):
            return self.noun_or_name()
        pronoun = _SUBJECT_PRONOUNS.get(word or "")
        if pronoun is not None:
            self.pos += 1
            return pronoun
        pronoun = _OBJECT_PRONOUNS.get(word or "")
        if pronoun is not None and not (word in _DETERMINER_WORDS and self._possessive_her()):
            raise GrammarError(f"'{word}' at position {self.pos} cannot be a subject "
                               f"(use '{pronoun.english}')")
        if not (word in _DETERMINER_WORDS or _numeral(word or "") is not None or word in _NOUN_FORMS
                or word in _ADJECTIVE_WORDS):
            raise GrammarError(f"expected a subject at position {self.pos} but {self.found()}")
        return self.noun_phrase()

    # -- verb phrases -------------------------------------------------------------------------------------

    def verb_phrase(self, agreement: Agreement, subject_start: int, *, top_level: bool = False,
                    gap: bool = False) -> VerbPhrase:
        subject = self.text(subject_start)
        word = self.peek()
        tense = _AUXILIARIES.get(word or "")
        negated = False
        if tense is not None:
            auxiliary_position = self.pos
            self.pos += 1
            if self.peek() == _NOT:
                negated = True
                self.pos += 1
            elif word != "will":
                raise GrammarError(f"expected 'not' after '{word}' at position {self.pos} but {self.found()}")
            if tense is Tense.PRESENT:
                expected = "does" if agreement.third_singular else "do"
                if word != expected:
                    raise GrammarError(f"'{word}' at position {auxiliary_position} does not agree with the "
                                       f"subject '{subject}' (expected '{expected}')")
            entry = _VERB_FORMS.get(self.peek() or "")
            if entry is None or entry[1] != _BASE:
                hint = f" ('{entry[0].english}')" if entry is not None else ""
                raise GrammarError(f"expected the base form of a verb{hint} after "
                                   f"'{self.text(auxiliary_position)}' at position {self.pos} "
                                   f"but {self.found()}")
            verb = entry[0]
        else:
            entry = _VERB_FORMS.get(word or "")
            if entry is None:
                raise GrammarError(f"expected a verb after '{subject}' at position {self.pos} "
                                   f"but {self.found()}")
            verb, slot = entry
            if slot == _PAST:
                tense = Tense.PAST
            else:
                tense = Tense.PRESENT
                expected = verb.english_form(tense, agreement)
                if word != expected:
                    raise GrammarError(f"'{word}' at position {self.pos} does not agree with the subject "
                                       f"'{subject}' (expected '{expected}')")
        verb_position = self.pos
        self.pos += 1

        obj: NounPhrase | Pronoun | Coordination | Name | None = None
        if gap:
            # "the cat that the dog sees": the antecedent is the object, so the verb must be able to take one.
            if verb.valency is Valency.INTRANSITIVE:
                raise GrammarError(f"'{self.words[verb_position]}' at position {verb_position} takes no "
                                   f"object, so it cannot end the relative clause "
                                   f"'{self.text(subject_start - 1)}'")
            return VerbPhrase(verb, tense, negated)
        word = self.peek()
        if verb.valency is not Valency.INTRANSITIVE:
            # Name the likely mistake rather than only the missing object.
            if word in _NOUN_FORMS or word in _ADJECTIVE_WORDS:
                raise GrammarError(f"expected a determiner before '{word}' at position {self.pos}")
            if word in _SUBJECT_PRONOUNS and word not in _OBJECT_PRONOUNS:
                raise GrammarError(f"'{word}' at position {self.pos} cannot be an object "
                                   f"(use '{_SUBJECT_PRONOUNS[word].english_object}')")
        if self._starts_object() or word in _NOUN_FORMS or word in _ADJECTIVE_WORDS:
            if verb.valency is Valency.INTRANSITIVE:
                raise GrammarError(f"'{self.words[verb_position]}' at position {verb_position} takes no "
                                   f"object but {self.found()} at position {self.pos}")
            obj = self.object(top_level)
        elif verb.valency is Valency.TRANSITIVE:
            raise GrammarError(f"expected an object after '{self.words[verb_position]}' at position "
                               f"{self.pos} but {self.found()}")
        adjunct = None
        if not isinstance(obj, NounPhrase | Coordination) and self.peek() in _PREPOSITION_WORDS:
            adjunct = self.prepositional_phrase()
        return VerbPhrase(verb, tense, negated, obj, adjunct)

    def object(self, top_level: bool) -> NounPhrase | Pronoun | Coordination | Name:
        word = self.peek() or ""
        pronoun = _OBJECT_PRONOUNS.get(word)
        if pronoun is not None and not (word in _DETERMINER_WORDS and self._possessive_her()):
            self.pos += 1
            return pronoun
        first = self.noun_or_name()
        word = self.peek()
        if not top_level or (word != "and" and word != "or") or self._clause_follows():
            return first
        conjunction = _CONJUNCTION_WORDS[word]
        items = [first]
        while self.peek() == conjunction.english and not self._clause_follows():
            self.pos += 1
            items.append(self.noun_or_name())
        return Coordination(conjunction, tuple(items))

    def _clause_follows(self) -> bool:
        """Whether the conjunction at the current position starts a clause: a subject, then a verb."""
        saved = self.pos
        self.pos += 1
        try:
            self.subject()
            word = self.peek()
            return word is not None and (word in _AUXILIARIES or word in _VERB_FORMS)
        except GrammarError:
            return False
        finally:
            self.pos = saved

    # -- noun phrases -------------------------------------------------------------------------------------

    def noun_phrase(self) -> NounPhrase:
        start = self.pos
        word = self.peek()
        determiner = _DETERMINER_WORDS.get(word or "")
        numeral = None
        if determiner is not None:
            self.pos += 1
            numeral = _numeral(self.peek() or "")
            if numeral is not None:
                if not determiner.takes_numeral or numeral.value == 1:
                    raise GrammarError(f"'{numeral.english}' at position {self.pos} cannot follow '{word}'")
                self.pos += 1
        else:
            numeral = _numeral(word or "")
            if numeral is None:
                if word in _NOUN_FORMS or word in _ADJECTIVE_WORDS:
                    raise GrammarError(f"expected a determiner before '{word}' at position {self.pos}")
                raise GrammarError(f"expected a noun phrase at position {self.pos} but {self.found()}")
            self.pos += 1
        adjectives = []
        while (adjective := _ADJECTIVE_WORDS.get(self.peek() or "")) is not None:
            adjectives.append(adjective)
            self.pos += 1
        entry = _NOUN_FORMS.get(self.peek() or "")
        if entry is None:
            raise GrammarError(f"expected a noun after '{self.text(start)}' at position {self.pos} "
                               f"but {self.found()}")
        noun, number = entry
        noun_position = self.pos
        self.pos += 1

        for required, owner in ((determiner and determiner.number, word), (numeral and numeral.number,
                                                                          numeral and numeral.english)):
            if required is not None and required is not number:
                raise GrammarError(f"'{self.words[noun_position]}' at position {noun_position} does not "
                                   f"agree with '{owner}' (expected '{noun.english_form(required)}')")
        if determiner is not None and determiner.english_before_vowel is not None:
            following = self.words[start + 1]
            expected = determiner.english_before_vowel if following[0] in _VOWELS else determiner.english
            if word != expected:
                raise GrammarError(f"expected '{expected}' before '{following}' at position {start}, "
                                   f"not '{word}'")

        modifier: PrepositionalPhrase | RelativeClause | None = None
        following_word = self.peek()
        if following_word in _PREPOSITION_WORDS:
            modifier = self.prepositional_phrase()
        elif following_word in _RELATIVE_PRONOUNS:
            modifier = self.relative_clause(_THIRD_SG if number is _SG else _THIRD_PL, start)
        return NounPhrase(determiner, numeral, tuple(adjectives), noun, number, modifier)

    def prepositional_phrase(self) -> PrepositionalPhrase:
        preposition = _PREPOSITION_WORDS[self.peek() or ""]
        self.pos += 1
        return PrepositionalPhrase(preposition, self.noun_or_name())

    def relative_clause(self, antecedent: Agreement, antecedent_start: int) -> RelativeClause:
        pronoun = self.peek() or ""
        self.pos += 1
        word = self.peek()
        if word in _AUXILIARIES or word in _VERB_FORMS:
            # Subject gap: the antecedent does what the verb says and the verb agrees with it.
            return RelativeClause(pronoun, None, self.verb_phrase(antecedent, antecedent_start))
        if word is None:
            raise GrammarError(f"expected a relative clause after '{pronoun}' at position {self.pos} "
                               "but the sentence ended")
        subject_start = self.pos
        subject = self.nominal()
        predicate = self.verb_phrase(_agreement(subject), subject_start, gap=True)
        return RelativeClause(pronoun, subject, predicate)


def parse(sentence: str) -> Sentence:
    """The syntax tree of an English sentence of the toy grammar (whitespace and case are normalised)."""
    if not isinstance(sentence, str):
        raise TypeError(f"expected a string, got {type(sentence).__name__}")
    words = sentence.lower().split()
    if not words:
        raise GrammarError("empty input: expected an English sentence")
    for position, word in enumerate(words):
        if word not in _ENGLISH_WORDS:
            raise GrammarError(f"unknown word '{word}' at position {position}")
    return _Parser(words).sentence()


# "don't" and its kin are read as their full forms; the curly apostrophe is the straight one (normal_word).
_CONTRACTED_NEGATIONS = {"don't": ("do", "not"), "doesn't": ("does", "not"), "didn't": ("did", "not"),
                         "won't": ("will", "not")}


def translate(text: str) -> Pair:
    """The reference translation, with its gold alignment, of a text as people type it.

    A text is one or more sentences of the grammar, each optionally ended by `.`, `!` or `?`, with commas
    only before a conjunction that joins two clauses. Capitals are free: the target's sentence starts with a
    capital (or is in capitals) when the source's does; a capitalised word outside the lexicon is a name and a
    number in digits a numeral, both copied. Source and target are written as `service.core.text` writes
    tokens, and the alignment indexes its tokens (words and marks).

    Raises `GrammarError` naming the first unknown word or the first construction the grammar lacks.
    """
    if not isinstance(text, str):
        raise TypeError(f"expected a string, got {type(text).__name__}")
    typed = split_words(text)
    if not typed:
        raise GrammarError("empty input: expected an English sentence")
    target: list[str] = []
    alignment: list[tuple[int, ...]] = []
    for start, end in sentence_spans(typed):
        tokens = _translate_sentence(typed, start, end)
        names = {word for word in typed[start:end] if _is_name(word)}
        words = [word for word, _ in tokens]
        kept = [word in names for word in words]
        target.extend(apply_case(words, sentence_case(typed[start:end]), keep=kept.__getitem__))
        alignment.extend(sources for _, sources in tokens)
    return Pair(join_tokens(typed), join_tokens(target), tuple(alignment))


def _translate_sentence(typed: list[str], start: int, end: int) -> list[_Token]:
    """Target tokens of typed[start:end] (one sentence), their sources indexing `typed`."""
    mark = end - 1 if typed[end - 1] in SENTENCE_ENDS else None
    words: list[str] = []  # what the parser reads: lowercase, contractions expanded, names as typed
    origin: list[int] = []  # the typed token behind each of them
    commas: list[int] = []
    for index in range(start, end if mark is None else mark):
        word = typed[index]
        if word == ",":
            commas.append(index)
            continue
        if word in MARKS:
            where = "one mark ends a sentence" if word in SENTENCE_ENDS else "English has no opening marks"
            raise GrammarError(f"unexpected '{word}' at position {index}: {where}")
        normal = normal_word(word)
        expanded = _CONTRACTED_NEGATIONS.get(normal)
        if expanded is not None:
            words.extend(expanded)
            origin.extend((index, index))
            continue
        if _is_name(word):
            words.append(word)
        elif normal in _ENGLISH_WORDS or is_number(word):
            words.append(normal)
        else:
            raise GrammarError(f"unknown word '{word}' at position {index}")
        origin.append(index)
    if not words:
        raise GrammarError(f"expected a sentence before '{typed[end - 1]}' at position {end - 1}")
    renderer = _Renderer()
    tokens = [(word, tuple(sorted({origin[p] for p in sources})))
              for word, sources in renderer.sentence(_Parser(words).sentence())]
    joins = {origin[p] for p in renderer.clause_joins}
    for comma in commas:
        if comma + 1 not in joins:
            raise GrammarError(f"a comma (position {comma}) may only come before a conjunction that joins "
                               "two clauses ('the dog runs, but the cat sleeps')")
        conjunction = next(i for i, (_, sources) in enumerate(tokens) if sources == (comma + 1,))
        tokens.insert(conjunction, (",", (comma,)))
    if mark is not None:
        tokens.append((typed[mark], (mark,)))
        opening = OPENING.get(typed[mark])  # a Spanish question or exclamation opens with its own mark
        if opening is not None:
            tokens.insert(0, (opening, (mark,)))
    return tokens


# ---------------------------------------------------------------------------------------------------------
# 6. Sampling
# ---------------------------------------------------------------------------------------------------------


# Names for the sampler: capitalised, outside both lexicons. Training texts use the first list; the `names`
# split uses the second, so its names (and its numbers, 100 and above) never occur in training.
TRAIN_NAMES = (
    "Maria", "John", "Ana", "Peter", "Lucia", "Carlos", "Emma", "David", "Sofia", "Daniel", "Laura", "Pablo",
    "Elena", "Marco", "Julia", "Diego", "Clara", "Hugo", "Nora", "Ivan", "Olga", "Hector", "Rosa", "Tobias",
    "Alba", "Bruno", "Carmen", "Felix", "Greta", "Lorenzo", "Marta", "Nico", "Paula", "Raul", "Sara",
    "Victor",
    "London", "Madrid", "Paris", "Berlin", "Lima", "Quito", "Oslo", "Rome",
)
HELD_OUT_NAMES = (
    "Beatriz", "Gonzalo", "Ximena", "Wolfgang", "Kenji", "Amara", "Thandiwe", "Dmitri", "Fiona", "Yusuf",
    "Ingrid", "Mateo", "Zoe", "Rafael", "Aiko", "Bogdan", "Catalina", "Eduardo", "Henrik", "Imani", "Jorge",
    "Katya", "Leandro", "Mireille", "Octavio", "Priya", "Quentin", "Sven", "Tatiana", "Ulrich", "Valentina",
    "Wanjiru", "Yolanda", "Zeynep", "Nairobi", "Toronto", "Bogota", "Kyoto", "Dublin", "Santiago",
)
TRAIN_NUMBERS = (0, 99)  # numbers in digits in training texts ("1" is singular, the rest plural)
HELD_OUT_NUMBERS = (100, 99_999)


@dataclass(frozen=True, slots=True)
class SamplerConfig:
    """Probabilities of the sampler.  Lengths are steered by `max_depth`, `p_modifier`, `modifier_decay`
    and the clause / coordination probabilities, and bounded by rejection to [min_words, max_words] tokens
    (words and marks) per text."""

    min_words: int = 3
    max_words: int = 40
    max_clauses: int = 3
    p_more_clauses: float = 0.2  # after each clause, chance of coordinating one more
    max_depth: int = 3  # nesting of prepositional phrases and relative clauses
    p_modifier: float = 0.3  # a noun phrase at depth 0 gets a PP or relative clause ...
    modifier_decay: float = 0.5  # ... and this factor less per level of nesting
    p_relative: float = 0.45  # share of modifiers that are relative clauses
    p_object_gap: float = 0.35  # share of relative clauses on animate nouns whose gap is the object
    p_subject_pronoun: float = 0.4
    p_object_pronoun: float = 0.3
    p_coordination: float = 0.1  # a top-level subject or (last clause's) object is a coordination
    p_object: float = 0.6  # a verb that may take an object takes one
    p_adjunct: float = 0.35  # a PP after a verb without a noun-phrase object
    p_adjective: float = 0.3  # chance of each further adjective
    max_adjectives: int = 3
    p_plural: float = 0.35
    p_numeral: float = 0.12
    p_negation: float = 0.2
    # Names and numbers.
    p_name: float = 0.0  # a subject, object or prepositional object is a name
    p_digits: float = 0.0  # a numeral is written in digits
    held_out: bool = False  # names and numbers from the held-out lists
    # The surface: how people write the sentence.
    p_capital: float = 0.0  # a sentence starts with a capital
    p_upper: float = 0.0  # a sentence is written in capitals
    p_final_mark: float = 0.0  # a sentence ends with a mark: "." mostly, "?" and "!" too
    p_question: float = 0.2  # share of final marks that are "?" ...
    p_exclamation: float = 0.1  # ... and "!"
    p_comma: float = 0.0  # a comma before a conjunction that joins clauses
    p_contraction: float = 0.0  # "do not" written "don't" (and kin)
    p_curly: float = 0.25  # share of contractions typed with the curly apostrophe
    p_more_sentences: float = 0.0  # after each sentence, chance of one more in the same text
    max_sentences: int = 3

    def __post_init__(self) -> None:
        # Sampling rejects texts outside the bounds, so impossible bounds would never return.
        if not 2 <= self.min_words <= self.max_words:
            raise ValueError(f"need 2 <= min_words <= max_words, got {self.min_words} and {self.max_words}")


DEFAULT_SAMPLER = SamplerConfig()
TRAIN_MAX_WORDS = 40
LONG_MIN_WORDS, LONG_MAX_WORDS = 50, 60  # 1.25-1.5x the longest training text
# Text as people type it, in the proportions the training data holds them.
_USER_SURFACE = {"p_capital": 0.6, "p_upper": 0.03, "p_final_mark": 0.6, "p_comma": 0.5,
                 "p_contraction": 0.5, "p_more_sentences": 0.2}
TRAIN_SAMPLER = SamplerConfig(max_words=TRAIN_MAX_WORDS, p_name=0.08, p_digits=0.35, **_USER_SURFACE)
# Every text typed like a person would: capitals, marks, commas, contractions, often several sentences.
USER_SAMPLER = SamplerConfig(max_words=TRAIN_MAX_WORDS, p_capital=0.9, p_upper=0.1, p_final_mark=1.0,
                             p_comma=0.8, p_contraction=0.7, p_more_sentences=0.35, p_negation=0.35)
# Names and numbers that training never saw, in texts typed like people do.
NAMES_SAMPLER = SamplerConfig(max_words=TRAIN_MAX_WORDS, p_name=0.35, p_digits=1.0, p_numeral=0.3,
                              held_out=True, **_USER_SURFACE)
# Longer than anything in train (one sentence): more clauses, deeper nesting, fewer pronouns.
LONG_SAMPLER = SamplerConfig(min_words=LONG_MIN_WORDS, max_words=LONG_MAX_WORDS, p_more_clauses=0.6,
                             max_depth=4, p_modifier=0.6, modifier_decay=0.7, p_subject_pronoun=0.2,
                             p_object_pronoun=0.15, p_coordination=0.25, p_adjective=0.4, p_name=0.08,
                             p_digits=0.35, **{**_USER_SURFACE, "p_more_sentences": 0.0})
# Training's longer texts: single sentences of 24-40 tokens built like `long`'s. The plain mix holds few
# texts near its longest (0.2% reach 40 tokens), and a model that has rarely read a text near its longest
# does not hold up past it (docs/decisions/long-sentences.md).
TRAIN_LONGER_SAMPLER = replace(LONG_SAMPLER, min_words=24, max_words=TRAIN_MAX_WORDS)
TRAIN_LONGER_SHARE = 0.45

_ANIMATE_NOUNS = tuple(noun for noun in NOUNS if noun.kind is not _THING)
_VERBS_WITH_OBJECT = tuple(verb for verb in VERBS if verb.valency is not Valency.INTRANSITIVE)
_COORDINABLE_PRONOUNS = tuple(pronoun for pronoun in PRONOUNS if pronoun.coordinable)
_I = PRONOUNS[0]
_TENSES = tuple(Tense)
_SINGULAR_DETERMINERS = tuple(d for d in DETERMINERS if d.number is not _PL)
_PLURAL_DETERMINERS = tuple(d for d in DETERMINERS if d.number is not _SG)
_NUMERAL_DETERMINERS = tuple(d for d in DETERMINERS if d.takes_numeral)
_ONE, _PLURAL_NUMERALS = NUMERALS[0], NUMERALS[1:]
_NEGATION_AUXILIARIES = {"do": "don't", "does": "doesn't", "did": "didn't", "will": "won't"}


class _Sampler:
    """Draws a tree top-down.  It only builds trees the parser reads back the same way (see the module
    docstring): objects coordinate only in the last clause, noun phrases only at the top level."""

    def __init__(self, rng: random.Random, config: SamplerConfig) -> None:
        self.rng = rng
        self.config = config
        self.names = HELD_OUT_NAMES if config.held_out else TRAIN_NAMES
        self.numbers = HELD_OUT_NUMBERS if config.held_out else TRAIN_NUMBERS

    def sentence(self) -> Sentence:
        rng, config = self.rng, self.config
        count = 1
        while count < config.max_clauses and rng.random() < config.p_more_clauses:
            count += 1
        clauses = tuple(self.clause(last=index == count - 1) for index in range(count))
        conjunctions = tuple(rng.choice(CONJUNCTIONS) for _ in range(count - 1))
        return Sentence(clauses, conjunctions)

    def clause(self, last: bool) -> Clause:
        if self.rng.random() < self.config.p_coordination:
            subject: NounPhrase | Pronoun | Coordination | Name = self.coordinated_subject()
        else:
            subject = self.nominal(0)
        return Clause(subject, self.verb_phrase(0, coordinate_object=last))

    def name(self) -> Name | None:
        return Name(self.rng.choice(self.names)) if self.rng.random() < self.config.p_name else None

    def nominal(self, depth: int) -> NounPhrase | Pronoun | Name:
        if self.rng.random() < self.config.p_subject_pronoun:
            return self.rng.choice(PRONOUNS)
        return self.name() or self.noun_phrase(depth, _ANIMATE_NOUNS)

    def coordinated_subject(self) -> Coordination:
        rng = self.rng
        conjunction = _AND if rng.random() < 0.75 else _OR
        items: list[NounPhrase | Pronoun | Name] = []
        for _ in range(2 if rng.random() < 0.8 else 3):
            # Pronouns join only with "and": "or" would make English agreement ("you or i am") awkward.
            if conjunction is _AND and rng.random() < self.config.p_subject_pronoun / 2:
                pronoun = rng.choice(_COORDINABLE_PRONOUNS)
                if pronoun not in items:
                    items.append(pronoun)
                    continue
            items.append(self.name() or self.noun_phrase(0, _ANIMATE_NOUNS))
        if _I in items[:-1]:  # English puts the speaker last: "the dog and i"
            items.remove(_I)
            items.append(_I)
        return Coordination(conjunction, tuple(items))

    def verb_phrase(self, depth: int, *, coordinate_object: bool = False, gap: bool = False) -> VerbPhrase:
        rng, config = self.rng, self.config
        verb = rng.choice(_VERBS_WITH_OBJECT if gap else VERBS)
        tense = rng.choice(_TENSES)
        negated = rng.random() < config.p_negation
        if gap:
            return VerbPhrase(verb, tense, negated)
        obj: NounPhrase | Pronoun | Coordination | Name | None = None
        valency = verb.valency
        if valency is Valency.TRANSITIVE or (valency is Valency.OPTIONAL and rng.random() < config.p_object):
            if rng.random() < config.p_object_pronoun:
                obj = rng.choice(PRONOUNS)
            elif coordinate_object and rng.random() < config.p_coordination:
                conjunction = _AND if rng.random() < 0.75 else _OR
                count = 2 if rng.random() < 0.8 else 3
                obj = Coordination(conjunction, tuple(self.name() or self.noun_phrase(depth, NOUNS)
                                                      for _ in range(count)))
            else:
                obj = self.name() or self.noun_phrase(depth, NOUNS)
        adjunct = None
        if not isinstance(obj, NounPhrase | Coordination) and rng.random() < config.p_adjunct:
            adjunct = PrepositionalPhrase(rng.choice(PREPOSITIONS),
                                          self.name() or self.noun_phrase(depth + 1, NOUNS))
        return VerbPhrase(verb, tense, negated, obj, adjunct)

    def noun_phrase(self, depth: int, nouns: tuple[Noun, ...]) -> NounPhrase:
        rng, config = self.rng, self.config
        noun = rng.choice(nouns)
        number = _PL if rng.random() < config.p_plural else _SG
        determiner, numeral = self.determiner(number)
        count = 0
        while count < config.max_adjectives and rng.random() < config.p_adjective:
            count += 1
        adjectives = tuple(rng.sample(ADJECTIVES, count)) if count else ()
        modifier: PrepositionalPhrase | RelativeClause | None = None
        if depth < config.max_depth and rng.random() < config.p_modifier * config.modifier_decay ** depth:
            if rng.random() < config.p_relative:
                modifier = self.relative_clause(depth + 1, noun)
            else:
                modifier = PrepositionalPhrase(rng.choice(PREPOSITIONS),
                                               self.name() or self.noun_phrase(depth + 1, NOUNS))
        return NounPhrase(determiner, numeral, adjectives, noun, number, modifier)

    def determiner(self, number: Number) -> tuple[Determiner | None, Numeral | None]:
        rng = self.rng
        if rng.random() < self.config.p_numeral:
            digits = rng.random() < self.config.p_digits
            if number is _SG:
                return None, _digits_numeral("1") if digits else _ONE
            if digits:
                low, high = self.numbers
                value = rng.randint(low, high)
                numeral = _digits_numeral(str(value if value != 1 else 2))
            else:
                numeral = rng.choice(_PLURAL_NUMERALS)
            return (rng.choice(_NUMERAL_DETERMINERS) if rng.random() < 0.4 else None), numeral
        if rng.random() < 0.45:  # "the" is by far the most common determiner
            return _THE, None
        return rng.choice(_SINGULAR_DETERMINERS if number is _SG else _PLURAL_DETERMINERS), None

    def relative_clause(self, depth: int, antecedent: Noun) -> RelativeClause:
        rng = self.rng
        pronoun = "who" if antecedent.kind is _PERSON and rng.random() < 0.5 else "that"
        # Things do not act, so they get object-gap clauses ("the book that i write").
        if antecedent.kind is _THING or rng.random() < self.config.p_object_gap:
            subject = self.nominal(depth)
            return RelativeClause(pronoun, subject, self.verb_phrase(depth, gap=True))
        return RelativeClause(pronoun, None, self.verb_phrase(depth))

    def surface(self, sentence: Sentence) -> list[str]:
        """The sentence's tokens as a person might type them."""
        rng, config = self.rng, self.config
        renderer = _Renderer()
        renderer.sentence(sentence)
        words, joins = renderer.source, set(renderer.clause_joins)
        typed: list[str] = []
        index = 0
        while index < len(words):
            word = words[index]
            following = words[index + 1] if index + 1 < len(words) else None
            if (following == _NOT and word in _NEGATION_AUXILIARIES
                    and rng.random() < config.p_contraction):
                contracted = _NEGATION_AUXILIARIES[word]
                curly = rng.random() < config.p_curly
                typed.append(contracted.replace("'", "\u2019") if curly else contracted)
                index += 2
                continue
            if index in joins and rng.random() < config.p_comma:
                typed.append(",")
            typed.append(word)
            index += 1
        if rng.random() < config.p_upper:
            typed = [word.upper() for word in typed]
        elif rng.random() < config.p_capital:
            typed[0] = typed[0][:1].upper() + typed[0][1:]
        if rng.random() < config.p_final_mark:
            draw = rng.random()
            typed.append("?" if draw < config.p_question
                         else "!" if draw < config.p_question + config.p_exclamation else ".")
        return typed

    def text(self) -> str:
        """One or more sentences as a person might type them."""
        typed = self.surface(self.sentence())
        count = 1
        while count < self.config.max_sentences and self.rng.random() < self.config.p_more_sentences:
            if typed[-1] not in SENTENCE_ENDS:  # a sentence that another follows needs its end mark
                typed.append(".")
            typed.extend(self.surface(self.sentence()))
            count += 1
        return join_tokens(typed)


def _sample(rng: random.Random, config: SamplerConfig) -> Pair:
    while True:  # rejection keeps the length inside the configured bounds
        text = _Sampler(rng, config).text()
        pair = translate(text)
        tokens = split_words(pair.source)
        length = len(tokens)
        # Held-out names and numbers are what such a text is for: one without any is drawn again.
        copies = not config.held_out or any(is_number(w) or _is_name(w) for w in tokens if w not in MARKS)
        if config.min_words <= length <= config.max_words and copies:
            return pair


def sample_tree(rng: random.Random, config: SamplerConfig = DEFAULT_SAMPLER) -> Sentence:
    """One sentence's tree (no surface: what `render` turns into lowercase words)."""
    while True:
        tree = _Sampler(rng, config).sentence()
        if config.min_words <= len(render(tree).source.split()) <= config.max_words:
            return tree


def sample_pair(rng: random.Random, config: SamplerConfig = DEFAULT_SAMPLER) -> Pair:
    """A random text and its reference translation, typed as the config's surface probabilities say."""
    return _sample(rng, config)


def sample_sentence(rng: random.Random, config: SamplerConfig = DEFAULT_SAMPLER) -> str:
    return _sample(rng, config).source


# ---------------------------------------------------------------------------------------------------------
# 7. Splits
# ---------------------------------------------------------------------------------------------------------

SPLIT_SEEDS: dict[str, int] = {"train": 20_240_101, "valid": 20_240_202, "test": 20_240_303,
                               "long": 20_240_404, "user": 20_240_505, "names": 20_240_606}
DEFAULT_SPLIT_SIZES: dict[str, int] = {"train": 200_000, "valid": 1_000, "test": 1_000, "long": 500,
                                       "user": 1_000, "names": 1_000}
_SPLIT_SAMPLERS: dict[str, SamplerConfig] = {
    "train": TRAIN_SAMPLER,
    "valid": TRAIN_SAMPLER,
    "test": TRAIN_SAMPLER,
    "long": LONG_SAMPLER,
    "user": USER_SAMPLER,
    "names": NAMES_SAMPLER,
}
# Which held-out splits (at their default size and seed) a split must not share a text with.
_EXCLUDES: dict[str, tuple[str, ...]] = {"train": ("valid", "test", "long", "user", "names"), "valid": (),
                                         "test": ("valid",), "long": (), "user": (), "names": ()}


@cache
def _held_out_sources(name: str) -> frozenset[str]:
    return frozenset(pair.source for pair in _generate(name, DEFAULT_SPLIT_SIZES[name], SPLIT_SEEDS[name]))


def _generate(name: str, size: int, seed: int) -> tuple[Pair, ...]:
    excluded: set[str] = set()
    for other in _EXCLUDES[name]:
        excluded |= _held_out_sources(other)
    # Held-out splits hold distinct texts; train keeps the natural repetition of short sentences.
    distinct = name != "train"
    rng = random.Random(seed)
    config = _SPLIT_SAMPLERS[name]
    longer = TRAIN_LONGER_SHARE if name == "train" else 0.0
    pairs: list[Pair] = []
    while len(pairs) < size:
        pair = _sample(rng, TRAIN_LONGER_SAMPLER if longer and rng.random() < longer else config)
        if pair.source in excluded:
            continue
        if distinct:
            excluded.add(pair.source)
        pairs.append(pair)
    return tuple(pairs)


def generate_split(name: str, size: int | None = None, *, seed: int | None = None) -> list[Pair]:
    """A fixed split (a smaller `size` gives a prefix of the default): `train`, `valid` and `test` mix plain
    and user-typed text with names and numbers, up to TRAIN_MAX_WORDS tokens; `user` is all user-typed text;
    `names` has names and numbers absent from training; `long` is LONG_MIN_WORDS..LONG_MAX_WORDS tokens long.
    Train holds no text of the held-out splits, and test none of valid.  `seed` replaces the split's seed in
    SPLIT_SEEDS (the exclusions still refer to the default held-out splits).
    """
    if name not in SPLIT_SEEDS:
        raise ValueError(f"unknown split '{name}': expected one of {', '.join(SPLIT_SEEDS)}")
    size = DEFAULT_SPLIT_SIZES[name] if size is None else size
    if size < 0:
        raise ValueError(f"split size must be >= 0, got {size}")
    return list(_generate(name, size, SPLIT_SEEDS[name] if seed is None else seed))


def lexicon_words() -> tuple[set[str], set[str]]:
    """Every word an English sentence and a target sentence can contain, for building vocabularies."""
    english = {*_ENGLISH_WORDS, *_CONTRACTED_NEGATIONS}
    target = {_NEGATION_SPANISH, _RELATIVE_SPANISH, *_CONTRACTIONS.values()}
    for noun in NOUNS:
        target.update((noun.spanish, noun.spanish_plural))
    for adjective in ADJECTIVES:
        target.update(adjective.forms)
    for verb in VERBS:
        target.update((*verb.present, *verb.preterite, *verb.future))
    for determiner in DETERMINERS:
        target.update(form for form in determiner.forms if form)
    for numeral in NUMERALS:
        target.update(numeral.forms)
    for preposition in PREPOSITIONS:
        target.update(preposition.spanish)
    for pronoun in PRONOUNS:
        target.update(word for word in (pronoun.spanish, pronoun.spanish_object) if word)
    for conjunction in CONJUNCTIONS:
        target.add(conjunction.spanish)
    target.update(("e", "u"))  # "y"/"o" before /i/ and /o/ sounds
    return english, target


if {name.lower() for name in TRAIN_NAMES + HELD_OUT_NAMES} & {w for words in lexicon_words() for w in words}:
    raise RuntimeError("toy names: a name is also a word of the lexicon, so it would not read as a name")
