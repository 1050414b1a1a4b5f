#!/usr/bin/env python3
"""Extract a sentence sample from Jane Austen's six novels (public domain).

The Debian package ``r-cran-janeaustenr`` ships the novels as an R lazy-load database
(``data/Rdata.rdx`` index + ``data/Rdata.rdb`` blobs). ``rdata.read_rds`` reads the index; each
blob is a 4-byte big-endian length followed by a zlib stream of an R-serialised character
vector (one element per line of text), which ``rdata`` parses once decompressed.

The text is split into sentences of 8..60 words, deduplicated, and a seeded sample of 4000 is
written to ``src/slimtorch/data/text/austen_sentences.txt`` (one sentence per line, after a
``# source:`` header line).

For language-model perplexity (``--lm``) it also writes running text, novel by novel:
``austen_lm_calib.txt`` (the opening of Mansfield Park and Emma: calibration segments) and
``austen_lm_eval.txt`` (the opening of Persuasion: evaluation windows), paragraphs separated by
blank lines. The novels of the two files are disjoint.

Usage: python scripts/extract_austen.py [--data-dir DIR] [--n 4000] [--seed 0] [--out PATH]
       python scripts/extract_austen.py --lm [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import bz2
import lzma
import random
import re
import struct
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = Path("/usr/lib/R/site-library/janeaustenr/data")
DEFAULT_OUT = REPO / "src" / "slimtorch" / "data" / "text" / "austen_sentences.txt"
NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
MIN_WORDS, MAX_WORDS = 8, 60
LM_SPLITS = {"calib": (("mansfieldpark", "emma"), 240_000),  # novels, characters of each
             "eval": (("persuasion",), 160_000)}

# Abbreviations that end in "." but do not end a sentence.
_ABBREVIATIONS = ("Mr", "Mrs", "Dr", "St", "Messrs", "Col", "Capt", "Esq", "Ld")
_SENTENCE_END = re.compile(r'(?<=[.!?])["\']?\s+(?=["\']?[A-Z])')
_HEADING = re.compile(r"^(CHAPTER|VOLUME|Chapter|Volume)\b|^[A-Z .,'-]+$")


def _decompress_block(block: bytes, compression: int) -> bytes:
    """Decompress one value of an R lazy-load .rdb file.

    Every block starts with the 4-byte big-endian uncompressed length. With ``compress=1`` a
    zlib stream follows; with 2 or 3 a type byte (Z=zlib, 2=bzip2, X=xz, 0=stored) comes first.
    """
    if compression == 1:
        return zlib.decompress(block[4:])
    kind, payload = block[4:5], block[5:]
    decoders = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}
    if kind not in decoders:
        raise ValueError(f"unknown R lazy-load compression type {kind!r}")
    return decoders[kind](payload)


def read_lazyload_db(data_dir: Path) -> dict[str, list[str]]:
    """Read every character vector stored in ``data_dir/Rdata.{rdx,rdb}``, keyed by name."""
    import rdata
    import warnings

    index = rdata.read_rds(data_dir / "Rdata.rdx")
    raw = (data_dir / "Rdata.rdb").read_bytes()
    compression = int(index["compressed"][0])
    out: dict[str, list[str]] = {}
    for name, (offset, length) in index["variables"].items():
        block = raw[int(offset): int(offset) + int(length)]
        (expected,) = struct.unpack(">I", block[:4])
        data = _decompress_block(block, compression)
        if len(data) != expected:
            raise ValueError(f"{name}: decompressed {len(data)} bytes, index says {expected}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS"
            value = rdata.conversion.convert(rdata.parser.parse_data(data))
        out[str(name)] = [str(line) for line in value]
    return out


def paragraphs(lines: list[str]) -> list[str]:
    """Join the text's lines into paragraphs (blank lines separate them), dropping headings."""
    paras, current = [], []
    for line in lines + [""]:
        line = line.strip()
        if line:
            current.append(line)
        elif current:
            para = " ".join(current)
            if not _HEADING.match(para):
                paras.append(para)
            current = []
    return paras


def clean(text: str) -> str:
    """Remove italics markers and normalise whitespace and dashes."""
    text = text.replace("_", "").replace("--", " -- ")
    return re.sub(r"\s+", " ", text).strip()


def split_sentences(paragraph: str) -> list[str]:
    """Split a paragraph into sentences, re-joining splits made after an abbreviation."""
    pieces = _SENTENCE_END.split(paragraph)
    sentences: list[str] = []
    for piece in pieces:
        if sentences and sentences[-1].rsplit(" ", 1)[-1].strip("(\"'.") in _ABBREVIATIONS:
            sentences[-1] += " " + piece
        else:
            sentences.append(piece)
    return sentences


def is_clean(sentence: str) -> bool:
    """A sentence of 8..60 words, starting with a capital, ending in punctuation, balanced quotes."""
    n_words = len(sentence.split())
    return (
        MIN_WORDS <= n_words <= MAX_WORDS
        and sentence.isascii()
        and re.match(r'^["\']?[A-Z]', sentence) is not None
        and re.search(r'[.!?]["\']?$', sentence) is not None
        and sentence.count('"') % 2 == 0
        and sentence.count("(") == sentence.count(")")
        and not re.search(r"\d", sentence)
    )


def extract_sentences(novels: dict[str, list[str]]) -> list[str]:
    """All clean, unique sentences of the novels, in a stable (sorted) order."""
    found = set()
    for name in sorted(novels):
        for para in paragraphs(novels[name]):
            for sentence in split_sentences(clean(para)):
                sentence = sentence.strip()
                if is_clean(sentence):
                    found.add(sentence)
    return sorted(found)


def write_lm_text(novels: dict[str, list[str]], out_dir: Path) -> None:
    """The running-text files of ``LM_SPLITS`` (cleaned paragraphs, cut at a paragraph end)."""
    for split, (names, n_chars) in LM_SPLITS.items():
        parts = []
        for name in names:
            text, size = [], 0
            for para in paragraphs(novels[name]):
                if size >= n_chars:
                    break
                text.append(clean(para))
                size += len(text[-1]) + 2
            parts.append("\n\n".join(text))
        path = out_dir / f"austen_lm_{split}.txt"
        header = (f"# source: Jane Austen, {', '.join(names)} (opening {n_chars} characters of "
                  "each) from Debian package r-cran-janeaustenr (public domain), "
                  "scripts/extract_austen.py --lm")
        path.write_text(header + "\n" + "\n\n".join(parts) + "\n", encoding="utf-8")
        print(f"wrote {path} ({path.stat().st_size} bytes)")


def main() -> None:
    """Parse arguments, extract, sample and write the sentence file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--lm", action="store_true", help="write the running-text LM files")
    args = parser.parse_args()

    if not (args.data_dir / "Rdata.rdx").exists():
        raise SystemExit(f"{args.data_dir}/Rdata.rdx not found: apt-get install r-cran-janeaustenr")
    novels = {k: v for k, v in read_lazyload_db(args.data_dir).items() if k in NOVELS}
    if args.lm:
        write_lm_text(novels, args.out.parent)
        return
    sentences = extract_sentences(novels)
    sample = random.Random(args.seed).sample(sentences, args.n)

    header = (f"# source: Jane Austen, six novels ({', '.join(sorted(novels))}) from Debian package "
              f"r-cran-janeaustenr (public domain); {args.n} of {len(sentences)} unique sentences "
              f"of {MIN_WORDS}-{MAX_WORDS} words, seed {args.seed}, scripts/extract_austen.py")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + "\n" + "\n".join(sample) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, {len(sample)} sentences "
          f"from {len(sentences)} candidates)")


if __name__ == "__main__":
    main()
