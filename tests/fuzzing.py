"""Hypothesis building blocks shared by the fuzz tests (tests/unit/test_fuzz.py and
tests/integration/test_fuzz_http.py)."""
from hypothesis import strategies as st

# Text without lone surrogates: those are sent on purpose, as "\ud800" escapes in request bodies.
clean_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
json_leaves = st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) \
    | st.floats(allow_nan=False, allow_infinity=False) | clean_text
json_values = st.recursive(json_leaves, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(clean_text, inner, max_size=4), max_leaves=20)


def junk_or(*strategies):
    """One of the strategies, or any JSON value (the wrong type most of the time)."""
    return st.one_of(*strategies, json_values)


def split_at(data: bytes, cuts) -> list:
    """data cut at the given positions (taken modulo its length; any order, duplicates allowed)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0] + points, points + [len(data)])]
