"""Caption cleaning for YFCC100M titles and descriptions.

The SLIP reference (facebookresearch/SLIP) cleans YFCC captions with: `unquote`, `+` -> space,
strip `<a ...>`, `</a>`, `<b>`, `</b>`, `<i>`, `</i>`, strip URLs (`http\\S+`, `www\\S+`). On top
of that, what a careful user needs: `<br>` / `<p>` line-break tags removed too (Flickr descriptions
are full of them), ftfy repair of mojibake and HTML entities, control characters dropped, every run
of whitespace (including decoded newlines) collapsed to one space.
"""
from __future__ import annotations

import functools
import re
import unicodedata
from urllib.parse import unquote

# the reference's tags, plus line-break tags (which would otherwise glue words together)
_TAGS = re.compile(r"</?(?:a|b|i)(?:\s[^>]*)?>|</?(?:br|p)\s*/?>", re.IGNORECASE)
_URLS = re.compile(r"http\S+|www\S+")
_SPACE = re.compile(r"\s+")
# the blank "letters" (Hangul fillers, the blank Braille pattern): letters that show nothing
_BLANK_LETTERS = frozenset("\u115F\u1160\u3164\uFFA0\u2800")


@functools.cache
def _controls():
    # imported on first use: the loader needs has_visible_text, not ftfy or regex (a bare GPU machine
    # running tools/gpu_report.py may lack both)
    import regex
    return regex.compile(r"[\p{Cc}\p{Cf}]")   # after whitespace is collapsed: what is left goes


def clean_caption(raw: str) -> str:
    """One URL-encoded YFCC title or description -> clean single-line text ('' if nothing is left)."""
    if not raw:
        return ""
    text = unquote(raw, errors="replace").replace("+", " ")
    if "<" in text:           # each pattern needs its first character: skip the regex when absent
        text = _TAGS.sub(" ", text)
    if "http" in text or "www" in text:
        text = _URLS.sub(" ", text)
    return tidy_caption(text)


def tidy_caption(text: str) -> str:
    """A caption that is plain text already (CC3M, CC12M, RedCaps, COCO) -> one clean line: ftfy
    repair of mojibake and HTML entities, control characters dropped, whitespace collapsed ('' if
    nothing visible is left). YFCC's captions get this after their own decoding (`clean_caption`)."""
    if not text:
        return ""
    if not text.isascii() or "&" in text or "\x1b" in text:   # ftfy changes nothing else; it is slow
        import ftfy
        text = ftfy.fix_text(text)
    elif text.isprintable():  # printable ASCII (most captions): no control to drop, only spaces to collapse
        text = (_SPACE.sub(" ", text) if "  " in text else text).strip()
        return text          # printable ASCII shows something unless it is empty
    text = _controls().sub("", _SPACE.sub(" ", text))
    text = _SPACE.sub(" ", text).strip()
    return text if has_visible_text(text) else ""


def has_visible_text(text: str) -> bool:
    """Whether `text` shows anything: a caption made only of spaces, zero-width or other invisible
    characters is empty. A character shows unless it is whitespace, a separator (Z*), a control,
    format, unassigned or private character (C*: zero-width space, joiners, marks of direction), a
    lone combining mark (M*), or a blank letter."""
    for ch in text:
        if not (ch.isspace() or ch in _BLANK_LETTERS or unicodedata.category(ch)[0] in "ZCM"):
            return True
    return False


def join_caption(title: str, description: str) -> str:
    """The default caption (the sample's txt): title and description, either alone when the other is
    empty or the same, else `title. description` (no doubled full stop)."""
    if not description or description == title:
        return title
    if not title:
        return description
    sep = " " if title[-1] in ".!?:;" else ". "
    return title + sep + description


def truncate(text: str, max_chars: int) -> str:
    """Cut an absurdly long caption at the last word boundary before `max_chars`."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return (cut[:space] if space > max_chars // 2 else cut).rstrip()
