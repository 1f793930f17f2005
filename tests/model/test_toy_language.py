"""The toy English -> Spanish-like language: translation rules, parser, sampler and splits."""

from __future__ import annotations

import hashlib
import os
import random
import statistics
import subprocess
import sys
from dataclasses import replace

import pytest

from model import toy_language as tl
from model.toy_language import GrammarError, Pair, translate
from service.core.text import sentence_spans, split_words
from tests.conftest import ROOT


def target(sentence: str) -> str:
    return translate(sentence).target


# -- translation rules --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("english", "spanish"), [
    # adjectives follow the noun, in their English order
    ("the big red dog runs", "el perro grande rojo corre"),
    # object pronouns move before the verb
    ("i see her", "yo la veo"),
    ("she sees you", "ella te ve"),
    ("we will call them", "nosotros los llamaremos"),
    # do / does / did / will + not collapse into "no", before the clitic
    ("i do not see the cat", "yo no veo el gato"),
    ("he does not see me", "él no me ve"),
    ("they did not see us", "ellos no nos vieron"),
    ("you will not see him", "tú no lo verás"),
    # articles and adjectives agree with feminine plural nouns, numerals sit between
    ("the beautiful red flowers fell", "las flores hermosas rojas cayeron"),
    ("these two old women sing", "estas dos mujeres viejas cantan"),
    ("some tall white cows will run", "algunas vacas altas blancas correrán"),
    ("our young queens smiled", "nuestras reinas jóvenes sonrieron"),
    ("a happy mouse sleeps", "un ratón feliz duerme"),
    ("the happy mice sleep", "los ratones felices duermen"),
    ("an old cat ate an apple", "un gato viejo comió una manzana"),
    # contractions, two-word prepositions
    ("i go to the park", "yo voy al parque"),
    ("the friend of the king sleeps near the river", "el amigo del rey duerme cerca del río"),
    # relative clauses, subject and object gap
    ("the dog that sees the cat runs", "el perro que ve el gato corre"),
    ("the books that the teacher will write fell", "los libros que el maestro escribirá cayeron"),
    ("the man who loves her works", "el hombre que la ama trabaja"),
    # subject "it" is dropped; its verb still agrees
    ("it sees me", "me ve"),
    ("the dog that it sees sleeps", "el perro que ve duerme"),
    # "y" -> "e" before /i/, "o" -> "u" before /o/
    ("i run and it will go", "yo corro e irá"),
    ("i see the dogs or eight cats", "yo veo los perros u ocho gatos"),
    ("he runs but she sleeps", "él corre pero ella duerme"),
])
def test_reference_translations(english: str, spanish: str) -> None:
    assert target(english) == spanish


@pytest.mark.parametrize(("subject", "present", "past", "future"), [
    ("i", "veo", "vi", "veré"),
    ("you", "ves", "viste", "verás"),
    ("he", "ve", "vio", "verá"),
    ("she", "ve", "vio", "verá"),
    ("we", "vemos", "vimos", "veremos"),
    ("they", "ven", "vieron", "verán"),
    ("the dog", "ve", "vio", "verá"),
    ("the dogs", "ven", "vieron", "verán"),
    ("the dog and the cat", "ven", "vieron", "verán"),
    ("the dog and i", "vemos", "vimos", "veremos"),
    ("you and he", "ven", "vieron", "verán"),  # plural "you" is "ustedes": third person plural
    ("the dogs or the cat", "ve", "vio", "verá"),  # "or" agrees with the nearest conjunct
])
def test_verb_agrees_with_subject_in_each_tense(subject: str, present: str, past: str, future: str) -> None:
    third_singular = subject in ("he", "she", "the dog", "the dogs or the cat")
    sentences = {present: f"{subject} {'sees' if third_singular else 'see'} the bird",
                 past: f"{subject} saw the bird", future: f"{subject} will see the bird"}
    for form, sentence in sentences.items():
        words = target(sentence).split()
        assert form in words, (sentence, words)


def test_regular_and_irregular_paradigms() -> None:
    assert target("we walked") == "nosotros caminamos"
    assert target("i touched the door") == "yo toqué la puerta"  # spelling change before "é"
    assert target("i arrived") == "yo llegué"
    assert target("she went to the beach") == "ella fue a la playa"
    assert target("they will have the keys") == "ellos tendrán las llaves"
    assert target("the children slept") == "los niños durmieron"
    assert target("i will hear you") == "yo te oiré"


def test_alignment_examples() -> None:
    assert translate("i do not see the cat") == Pair(
        "i do not see the cat", "yo no veo el gato", ((0,), (1, 2), (3,), (4,), (5,)))
    # the verb aligns to "will"/"did" (tense), "no" to the auxiliary and "not"
    assert translate("it will not see me").alignment == ((1, 2), (4,), (0, 1, 3))
    assert translate("we did not find her").alignment == ((0,), (1, 2), (4,), (1, 3))
    assert translate("i see her").alignment == ((0,), (2,), (1,))
    # "cerca del" <- "near the": one contracted word for two English words
    assert translate("i walk near the river") == Pair(
        "i walk near the river", "yo camino cerca del río", ((0,), (1,), (2,), (2, 3), (4,)))
    assert translate("the big red dog runs").alignment == ((0,), (3,), (1,), (2,), (4,))


def test_coordination_is_resolved_by_the_words() -> None:
    # an "and" after a top-level object starts a clause exactly when a subject and a verb follow
    assert (target("i saw the bird and the dog and the cat ran")
            == "yo vi el pájaro y el perro y el gato corrieron")
    assert target("i saw the bird and the dog") == "yo vi el pájaro y el perro"
    # noun phrases never coordinate inside a relative clause: the "and" joins the subjects
    assert (target("the dog that sees the cat and the bird ran")
            == "el perro que ve el gato y el pájaro corrieron")
    assert target("i see the dog that sees the cat and the bird sleeps").endswith("y el pájaro duerme")


def test_whitespace_and_case_are_normalised() -> None:
    typed = translate("  i   See\tHER ")
    plain = translate("i see her")
    assert (typed.target, typed.alignment) == (plain.target, plain.alignment)
    assert typed.source == "i See HER"  # the source as typed, spaces normalised
    assert translate("  I   See\tHER ").target == "Yo la veo"


# -- text as people type it ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("The dog sees the cat.", "El perro ve el gato."),
    ("I see her!", "¡Yo la veo!"),
    ("She does not see me?", "¿Ella no me ve?"),
    ("the dog doesn't see the cat", "el perro no ve el gato"),
    ("the dog doesn\u2019t see the cat", "el perro no ve el gato"),
    ("It won't run. They didn't see me!", "No correrá. ¡Ellos no me vieron!"),
    ("THE DOG SEES THE CAT.", "EL PERRO VE EL GATO."),
    ("The dog runs, but the cat sleeps.", "El perro corre, pero el gato duerme."),
    ("Maria sees John and the 3 dogs.", "Maria ve John y los 3 perros."),
    ("maria sees 1 dog", None),  # a lowercase unknown word is not a name
    ("I see 1 dog and 12 cats.", "Yo veo 1 perro y 12 gatos."),
    ("i see the dog. The dog sees Maria? MARIA RUNS!", "yo veo el perro. ¿El perro ve Maria? ¡MARIA CORRE!"),
])
def test_text_as_people_type_it(text: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(GrammarError, match="unknown word 'maria'"):
            translate(text)
    else:
        assert translate(text).target == expected


def test_user_text_alignment_indexes_tokens() -> None:
    pair = translate("Maria doesn't see 3 dogs, but I run?")
    # ¿ Maria no ve 3 perros , pero yo corro ?
    assert pair.alignment == ((9,), (0,), (1,), (2,), (3,), (4,), (5,), (6,), (7,), (8,), (9,))


# -- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sentence", "message"), [
    ("the big xylophone runs", "unknown word 'xylophone' at position 2"),
    ("the dog runs -", "unknown word '-' at position 3"),
    ("the dog table", "expected a verb after 'the dog' at position 2 but found 'table'"),
    ("the big red dog", "expected a verb after 'the big red dog' at position 4 but the sentence ended"),
    ("i see dog", "expected a determiner before 'dog' at position 2"),
    ("the dog see me", "'see' at position 2 does not agree with the subject 'the dog' (expected 'sees')"),
    ("the dog do not run", "'do' at position 2 does not agree with the subject 'the dog' (expected 'does')"),
    ("he did not saw her", "expected the base form of a verb ('see') after 'did not' at position 3"),
    ("him sees me", "'him' at position 0 cannot be a subject (use 'he')"),
    ("i see he", "'he' at position 2 cannot be an object (use 'him')"),
    ("the dog runs the cat", "'runs' at position 2 takes no object"),
    ("the cat that the dog runs sleeps", "'runs' at position 5 takes no object"),
    ("two dog run", "'dog' at position 1 does not agree with 'two' (expected 'dogs')"),
    ("a apple fell", "expected 'an' before 'apple' at position 0"),
    ("i did see her", "expected 'not' after 'did' at position 2 but found 'see'"),
    ("i run and", "expected a subject at position 3 but the sentence ended"),
    ("i run the", "'run' at position 1 takes no object"),
    # text as people type it
    ("the dog, runs", "a comma (position 2) may only come before a conjunction that joins two clauses"),
    ("i see the dog, and the cat", "may only come before a conjunction that joins two clauses"),
    ("the dog runs?!", "unexpected '?' at position 3: one mark ends a sentence"),
    ("¿the dog runs?", "English has no opening marks"),
    ("the dog runs. .", "unexpected '.' at position 3: one mark ends a sentence"),
    ("!", "expected a sentence before '!' at position 0"),
    ("the dog runs; the cat sleeps", "unknown word 'runs;'"),
])
def test_errors_name_the_first_offending_word(sentence: str, message: str) -> None:
    with pytest.raises(GrammarError) as error:
        translate(sentence)
    assert message in str(error.value)


@pytest.mark.parametrize("sentence", ["", "   ", "\n\t"])
def test_empty_input_is_rejected(sentence: str) -> None:
    with pytest.raises(GrammarError, match="empty input"):
        translate(sentence)


# -- sampler, parser and renderer agree ----------------------------------------------------------------------


def _samples(count: int, seed: int, config: tl.SamplerConfig = tl.DEFAULT_SAMPLER) -> list[Pair]:
    rng = random.Random(seed)
    return [tl.sample_pair(rng, config) for _ in range(count)]


@pytest.mark.parametrize(("config", "count"), [
    (tl.DEFAULT_SAMPLER, 3000),
    (tl.LONG_SAMPLER, 300),
    # stresses exactly the constructions whose parse needs care: coordination, nesting, object gaps
    (replace(tl.DEFAULT_SAMPLER, p_coordination=0.7, p_more_clauses=0.7, p_modifier=0.8, p_relative=0.7,
             p_object_gap=0.6, p_adjunct=0.8, max_words=70), 1000),
])
def test_translate_reproduces_every_sampled_pair(config: tl.SamplerConfig, count: int) -> None:
    rng = random.Random(11)
    for _ in range(count):
        tree = tl.sample_tree(rng, config)
        pair = tl.render(tree)
        assert tl._Parser(pair.source.split()).sentence() == tree, pair.source  # names as typed
        assert translate(pair.source) == pair


def test_sample_functions_consume_the_generator_alike() -> None:
    pair = tl.sample_pair(random.Random(5))
    assert tl.sample_sentence(random.Random(5)) == pair.source
    assert tl.sample_pair(random.Random(5), tl.TRAIN_SAMPLER) == tl.sample_pair(random.Random(5),
                                                                               tl.TRAIN_SAMPLER)


@pytest.mark.parametrize("config", [tl.DEFAULT_SAMPLER, tl.TRAIN_SAMPLER, tl.USER_SAMPLER, tl.NAMES_SAMPLER])
def test_alignments_are_complete_and_valid(config: tl.SamplerConfig) -> None:
    for pair in _samples(2000, seed=3, config=config):
        source = split_words(pair.source)
        words = split_words(pair.target)
        assert len(pair.alignment) == len(words)
        covered = set()
        for sources in pair.alignment:
            assert sources and list(sources) == sorted(set(sources))
            assert all(0 <= i < len(source) for i in sources)
            covered.update(sources)
        assert covered == set(range(len(source))), pair  # no English word is silently dropped


def test_sampling_is_deterministic() -> None:
    assert _samples(300, seed=9) == _samples(300, seed=9)
    assert _samples(50, seed=9) != _samples(50, seed=10)


def output_digest() -> str:
    rng = random.Random(4)
    text = "\n".join(repr(tl.sample_pair(rng)) for _ in range(300)) + repr(tl.generate_split("test", 50))
    return hashlib.sha256(text.encode()).hexdigest()


def test_output_does_not_depend_on_hash_randomisation() -> None:
    script = "from tests.model.test_toy_language import output_digest; print(output_digest())"
    digests = {output_digest()}
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        digests.add(subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                                   text=True, check=True).stdout.strip())
    assert len(digests) == 1


def test_length_distribution_spans_short_and_long_sentences() -> None:
    pairs = _samples(10_000, seed=1)
    lengths = [len(p.source.split()) for p in pairs]
    assert min(lengths) == 3 and max(lengths) >= 38
    assert 6 <= statistics.median(lengths) <= 12
    assert sum(n <= 5 for n in lengths) > 1000  # short sentences are plentiful


# -- lexicon ------------------------------------------------------------------------------------------------


def test_lexicon_size_and_coverage() -> None:
    english, spanish = tl.lexicon_words()
    assert len(english) >= 250
    assert {"dog", "dogs", "table", "saw", "sees", "will", "not", "that", "who", "an", "twenty"} <= english
    assert {"perro", "perros", "mesa", "vio", "verá", "no", "que", "del", "al", "veinte"} <= spanish
    seen_english: set[str] = set()
    seen_spanish: set[str] = set()
    plain_long = replace(tl.LONG_SAMPLER, p_name=0.0, p_digits=0.0, p_capital=0.0, p_upper=0.0,
                         p_final_mark=0.0, p_comma=0.0, p_contraction=0.0)
    for pair in _samples(3000, seed=2) + _samples(200, seed=2, config=plain_long):
        seen_english.update(pair.source.split())
        seen_spanish.update(pair.target.split())
    assert seen_english <= english and seen_spanish <= spanish
    assert len(english - seen_english) < 0.05 * len(english)  # the sampler uses the whole lexicon


def test_lexicon_inflection() -> None:
    nouns = {noun.english: noun for noun in tl.NOUNS}
    assert (nouns["mouse"].english_plural, nouns["mouse"].spanish_plural) == ("mice", "ratones")
    assert (nouns["city"].english_plural, nouns["city"].spanish_plural) == ("cities", "ciudades")
    assert nouns["song"].spanish_plural == "canciones" and nouns["pencil"].spanish_plural == "lápices"
    assert nouns["hand"].gender is tl.Gender.FEMININE and nouns["map"].gender is tl.Gender.MASCULINE
    verbs = {verb.english: verb for verb in tl.VERBS}
    assert (verbs["carry"].english_third, verbs["carry"].english_past) == ("carries", "carried")
    assert verbs["watch"].english_third == "watches" and verbs["go"].english_third == "goes"
    assert len(tl.NUMERALS) == 20 and tl.NUMERALS[-1].english == "twenty"


# -- splits -------------------------------------------------------------------------------------------------


def test_splits_are_disjoint_and_bounded() -> None:
    train = tl.generate_split("train", size=20_000)
    valid, test, long = (tl.generate_split(name) for name in ("valid", "test", "long"))
    user, names = tl.generate_split("user"), tl.generate_split("names")
    assert [len(s) for s in (train, valid, test, long, user, names)] == [20_000, 1_000, 1_000, 500, 1_000,
                                                                         1_000]
    train_sources = {p.source for p in train}
    assert not train_sources & {p.source for p in test}
    assert not train_sources & {p.source for p in valid}
    assert not {p.source for p in valid} & {p.source for p in test}
    assert len({p.source for p in test}) == len(test)
    for pair in train + valid + test + user + names:
        assert 3 <= len(split_words(pair.source)) <= tl.TRAIN_MAX_WORDS
    for pair in long:
        assert tl.LONG_MIN_WORDS <= len(split_words(pair.source)) <= tl.LONG_MAX_WORDS
    assert tl.LONG_MIN_WORDS >= 1.25 * tl.TRAIN_MAX_WORDS and tl.LONG_MAX_WORDS <= 1.5 * tl.TRAIN_MAX_WORDS
    assert any(len(p.source.split()) == 3 for p in train)
    # names and numbers of the names split never occur in training
    train_words = {w for p in train for w in p.source.replace(",", " ").split()}
    held_out = {w.strip(".,!?") for p in names for w in p.source.split()} & set(tl.HELD_OUT_NAMES)
    assert len(held_out) >= 30 and not held_out & train_words
    words = [[w.strip(".,!?").lower() for w in p.source.split()] for p in names]
    held_out_names = {name.lower() for name in tl.HELD_OUT_NAMES}
    assert all(any(w.isdigit() or w in held_out_names for w in text) for text in words)


def test_train_holds_text_as_people_type_it_in_proportion() -> None:
    train = tl.generate_split("train", size=5_000)
    sources = [p.source for p in train]
    share = {
        "capital": sum(s[0].isupper() for s in sources) / len(sources),
        "final mark": sum(s[-1] in ".!?" for s in sources) / len(sources),
        "question": sum(s.endswith("?") for s in sources) / len(sources),
        "comma": sum("," in s for s in sources) / len(sources),
        "contraction": sum("n't" in s or "n\u2019t" in s for s in sources) / len(sources),
        "several sentences": sum(len(sentence_spans(split_words(s))) > 1
                                 for s in sources) / len(sources),
        "name": sum(any(w.strip(".,!?") in tl.TRAIN_NAMES for w in s.split())
                    for s in sources) / len(sources),
        "digits": sum(any(c.isdigit() for c in s) for s in sources) / len(sources),
    }
    assert 0.5 < share["capital"] < 0.8 and 0.55 < share["final mark"] < 0.8
    assert 0.1 < share["question"] < 0.2 and share["comma"] > 0.03
    assert share["contraction"] > 0.1 and 0.08 < share["several sentences"] < 0.2
    assert share["name"] > 0.1 and share["digits"] > 0.02
    assert sum(not any(c.isupper() or c in ".!?," for c in s) for s in sources) > 0.05 * len(sources)


def test_splits_are_fixed_prefixes() -> None:
    assert tl.generate_split("valid", 100) == tl.generate_split("valid")[:100]
    assert tl.generate_split("train", 50) == tl.generate_split("train", 50)
    assert tl.generate_split("train", 50, seed=1) != tl.generate_split("train", 50)
    assert len(set(tl.SPLIT_SEEDS.values())) == len(tl.SPLIT_SEEDS)
    assert tl.DEFAULT_SPLIT_SIZES == {"train": 200_000, "valid": 1_000, "test": 1_000, "long": 500,
                                      "user": 1_000, "names": 1_000}
    with pytest.raises(ValueError, match="unknown split"):
        tl.generate_split("dev")
