import random

import numpy as np

from orca2.curation.decontam import ContaminationIndex
from orca2.curation.dedup import ExactDeduper, NearDeduper
from orca2.curation.leaks import find_leak
from orca2.ngrams import MinHasher, ngrams, normalise_words


def jaccard(a, b, n=3):
    x, y = set(ngrams(normalise_words(a), n)), set(ngrams(normalise_words(b), n))
    return len(x & y) / len(x | y)


def text(rng, words=60):
    return " ".join(f"w{rng.randrange(5000)}" for _ in range(words))


def test_minhash_estimates_jaccard():
    rng = random.Random(0)
    hasher = MinHasher(num_perm=256)
    for keep in (0.95, 0.8, 0.5, 0.2):
        a = text(rng, 100).split()
        b = [w if rng.random() < keep else f"x{rng.randrange(10**6)}" for w in a]
        a, b = " ".join(a), " ".join(b)
        sig = hasher.signatures([a, b])
        estimate = float(np.mean(sig[0] == sig[1]))
        assert abs(estimate - jaccard(a, b)) < 0.08, (keep, estimate, jaccard(a, b))
    assert (hasher.signatures(["same words here"]) == hasher.signatures(["Same, words HERE!"])).all()


def test_near_deduper_s_curve():
    rng = random.Random(1)
    near = NearDeduper(threshold=0.8)
    bases = [text(rng) for _ in range(200)]
    assert near.check_batch(bases, [str(i) for i in range(200)]) == [None] * 200  # unrelated texts
    edited = [b.replace(b.split()[30], "changed", 1) for b in bases[:100]]  # one word: J ≈ 0.9
    rewritten = [" ".join(b.split()[:30]) + " " + text(rng, 30) for b in bases[100:]]  # half: J ≈ 0.33
    caught = near.check_batch(edited + rewritten, [f"e{i}" for i in range(200)])
    assert sum(c is not None for c in caught[:100]) >= 95
    assert sum(c is not None for c in caught[100:]) == 0
    assert caught[0] == "0"


def test_exact_deduper_groups():
    exact = ExactDeduper()
    assert exact.check("Hello, World", "a") is None
    assert exact.check("hello world!", "a") is None  # same group: not a duplicate
    assert exact.check("HELLO   world", "b") == "a"


def test_contamination_index_long_and_short_items():
    index = ContaminationIndex(n=13)
    index.add("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.", "gsm/1")
    index.add("not ( True and False ) or not ( False ) is", "bbh/1")  # 8 words: matched whole
    index.add("True and True is", "bbh/2")  # 4 words: too generic to index
    assert (
        index.find("Q: natalia SOLD clips to 48 of her friends in april and then she sold half as many").eval_id
        == "gsm/1"
    )
    assert (
        index.find("Natalia sold clips to 48 of her friends in April, and then bought pens") is None
    )  # 12 shared words
    assert index.find("Evaluate: not (True and False) or not (False) is what?").eval_id == "bbh/1"
    assert index.find("is it True and True is it") is None


def test_leak_phrases_and_ngrams():
    prompt = "Break the problem into short numbered steps and check the last step against the question."
    assert find_leak("As you instructed, here it is.", prompt)
    assert find_leak("The system prompt says to be brief.", None)
    assert find_leak("I was told to list the facts first.", None)
    assert find_leak("I will break the problem into short numbered steps and check the last step.", prompt)
    assert find_leak("1. 3 + 4 = 7.\n2. 7 * 2 = 14.\nThe answer is: 14", prompt) is None
    assert find_leak("The instructions of the recipe say to stir.", prompt) is None


def test_minhash_of_a_text_without_words_reads_only_its_own_shingles():
    hasher = MinHasher(num_perm=32)
    alone = hasher.signatures([""])[0]
    for batch in (["", "next text words"], ["one", ""], ["", ""], ["a b c d", "", "e"]):
        signatures = hasher.signatures(batch)  # the last text empty: no read past the end of the batch
        for text, signature in zip(batch, signatures):
            assert (signature == (alone if not text else hasher.signatures([text])[0])).all(), batch


def test_normalised_words_in_any_script():
    assert normalise_words("Привет, МИР!") == ["привет", "мир"]
    assert normalise_words("计算：三加四") == ["计", "算", "三", "加", "四"]  # unspaced: one token per character
    assert normalise_words("ＡＢＣ Straße") == ["abc", "strasse"]  # NFKC width, case folding
    assert normalise_words("हिन्दी भाषा") == ["हिन्दी", "भाषा"]  # combining vowel signs stay inside the word
    assert normalise_words("🍎🍎 ❤️") == ["🍎", "🍎", "❤️"] and normalise_words("🍎") != normalise_words("🍐")
    assert normalise_words("?!") == ["?", "!"] and normalise_words("! ?") != normalise_words("!!")
    assert normalise_words("Hello, world") == normalise_words("hello   WORLD!!")  # punctuation beside words: no word
