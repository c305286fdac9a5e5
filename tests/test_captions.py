from pipeline.captions import clean_caption, join_caption, truncate


def test_reference_rules():
    # unquote, then "+" -> space (the reference order: an encoded plus becomes a space too)
    assert clean_caption("a+b%20c%2Bd") == "a b c d"
    assert clean_caption("%3Cb%3Ebold%3C%2Fb%3E+%3Ci%3Eit%3C%2Fi%3E") == "bold it"
    assert clean_caption('%3Ca+href%3D%22http%3A%2F%2Fx.org%2F%22+rel%3D%22nofollow%22%3Elink%3C%2Fa%3E') == "link"
    assert clean_caption("see+http%3A%2F%2Fflic.kr%2Fp%2F1+and+https%3A%2F%2Fa.b+or+www.c.com%2Fd+end") == "see and or end"


def test_careful_user_extras():
    assert clean_caption("caf%C3%83%C2%A9") == "café"                       # mojibake (ftfy)
    assert clean_caption("Tom+%26amp%3B+Jerry") == "Tom & Jerry"             # HTML entity
    assert clean_caption("a%0A%0Ab%09c%0D%0Ad") == "a b c d"                 # newlines, tabs
    assert clean_caption("x%01y%E2%80%8Bz%7F") == "xyz"                      # control / format chars
    assert clean_caption("one%3Cbr%3Etwo%3Cbr+%2F%3Ethree") == "one two three"
    assert clean_caption("++%20++") == ""
    assert clean_caption("") == ""
    # other angle-bracket text is kept: it is not one of the stripped tags
    assert clean_caption("1+%3C+2+%3E+0") == "1 < 2 > 0"


def test_join_and_truncate():
    assert join_caption("Red bus", "A big bus") == "Red bus. A big bus"
    assert join_caption("Wow!", "A big bus") == "Wow! A big bus"
    assert join_caption("", "desc") == "desc"
    assert join_caption("title", "") == "title"
    assert join_caption("same", "same") == "same"
    assert truncate("word " * 10, 12) == "word word"
    assert truncate("short", 12) == "short"
    assert len(truncate("x" * 50, 10)) == 10


def test_a_caption_that_shows_nothing_is_empty():
    from pipeline.captions import has_visible_text
    assert clean_caption("%E2%80%8B%E2%80%8C%E2%80%8D%E2%81%A0%EF%BB%BF") == ""   # zero-width characters
    assert clean_caption("%E3%85%A4+%E2%A0%80") == ""                                # Hangul filler, blank Braille
    assert clean_caption("a%E2%80%8Bb") == "ab"
    for text in ("cat", "日本", "🙂", "e\u0301", "..."):
        assert has_visible_text(text), text
    for text in ("", " \t", "\u200b\ufeff", "\u0301", "\u3164\u115f"):
        assert not has_visible_text(text), repr(text)
