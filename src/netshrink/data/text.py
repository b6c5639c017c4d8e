"""Real English text: gensim's Lee corpus (prose, 50 documents with human similarity ratings), Jane Austen, and
the Wikipedia articles of gensim's shortened enwiki test dump."""
from __future__ import annotations

import re
import struct
import zlib
from functools import lru_cache
from typing import Literal

import numpy as np

from netshrink.data.paths import JANEAUSTENR_DB, gensim_test_data, require
from netshrink.errors import NetshrinkError

AUSTEN_BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")


@lru_cache(maxsize=None)
def _lee_background() -> str:
    path = require(gensim_test_data() / "lee_background.cor", "pip install gensim")
    return path.read_text(encoding="utf-8", errors="replace")


@lru_cache(maxsize=None)
def austen(book: str = "prideprejudice") -> str:
    """One novel from Debian's r-cran-janeaustenr, read from R's lazy-load database (no R needed)."""
    import warnings

    import rdata

    hint = "apt-get install r-cran-janeaustenr"
    index_path = require(JANEAUSTENR_DB.with_suffix(".rdx"), hint)
    db_path = require(JANEAUSTENR_DB.with_suffix(".rdb"), hint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = rdata.conversion.convert(rdata.parser.parse_file(index_path))
    offsets = {str(k): v for k, v in index["variables"].items()}
    if book not in offsets:
        raise NetshrinkError(f"unknown Austen book '{book}' ({', '.join(AUSTEN_BOOKS)})", where="book")
    start, length = (int(v) for v in offsets[book])
    with open(db_path, "rb") as handle:
        handle.seek(start)
        blob = handle.read(length)
    # Each record: 4-byte big-endian uncompressed length, then a zlib stream of R's serialisation.
    expected = struct.unpack(">I", blob[:4])[0]
    raw = zlib.decompress(blob[4:])
    if len(raw) != expected:
        raise NetshrinkError("corrupt R lazy-load record", where=f"{db_path}:{book}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lines = rdata.conversion.convert(rdata.parser.parse_data(raw))
    return "\n".join(str(line) for line in lines)


WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


@lru_cache(maxsize=None)
def wiki_sentences(min_words: int = 6, max_words: int = 60) -> tuple[str, ...]:
    """Sentences of the ~200 Wikipedia articles in gensim's test dump, markup stripped by gensim's own
    `filter_wiki`, in dump order (about 17,000 of 6 to 60 words): modern expository English."""
    import bz2
    import html

    from gensim.corpora.wikicorpus import filter_wiki

    path = require(gensim_test_data() / WIKI_DUMP, "pip install gensim")
    xml = bz2.open(path).read().decode("utf-8", errors="replace")
    pages = (html.unescape(t) for t in re.findall(r"<text[^>]*>(.*?)</text>", xml, flags=re.S))
    bodies = (re.sub(r"'{2,}", "", filter_wiki(t)) for t in pages if not t.lstrip().upper().startswith("#REDIRECT"))
    return tuple(s for s in split_sentences(" ".join(bodies))
                 if min_words <= len(s.split()) <= max_words and "=" not in s and "|" not in s)


def prose(source: Literal["lee", "austen"] = "lee") -> str:
    """A long stretch of real English prose for perplexity and calibration."""
    if source == "lee":
        return _lee_background()
    if source == "austen":
        return austen("prideprejudice")
    raise NetshrinkError(f"unknown prose source '{source}' (lee, austen)", where="source")


def split_sentences(text: str) -> list[str]:
    """Sentences of running prose: whitespace collapsed, split after . ! ? before a capital or a quote."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", re.sub(r"\s+", " ", text))]


def sentences(n: int | None = None, min_words: int = 6) -> list[str]:
    """Real sentences from the Lee background corpus, in corpus order (deterministic)."""
    found = [s for s in split_sentences(_lee_background()) if len(s.split()) >= min_words]
    return found if n is None else found[:n]


@lru_cache(maxsize=None)
def _similarity() -> tuple[tuple[str, ...], np.ndarray]:
    root = gensim_test_data()
    docs = require(root / "lee.cor", "pip install gensim").read_text(encoding="latin-1").splitlines()
    docs = tuple(d.strip() for d in docs if d.strip())
    matrix = np.loadtxt(require(root / "similarities0-1.txt", "pip install gensim"))
    if matrix.shape != (len(docs), len(docs)):
        raise NetshrinkError(f"similarity matrix is {matrix.shape} but there are {len(docs)} documents", where=str(root))
    return docs, matrix


def similarity_pairs() -> tuple[list[str], np.ndarray]:
    """Lee et al.'s 50 news documents and the 50x50 mean human similarity ratings (upper triangle is used)."""
    docs, matrix = _similarity()
    return list(docs), matrix.copy()
