"""One query engine for the CLI and the API: the query language, ``Searcher.run``, and ``vitrina search``.

The language's regular expressions (published in the API schema) are checked against a naive reader
written from the rules, on generated strings, in Python and in the ECMA dialect that validates JSON
Schema. Queries run over a real tiny index (``test_index.write_collection`` with an exact copy of one
file, embedded with ``clip-tiny``); rankings are checked against brute-force cosine over the stored vectors.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jsonschema_rs
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_index import image_path, make_encoder, write_collection

from vitrina.cli import main as cli
from vitrina.errors import UserError
from vitrina.index.embed import index_folder
from vitrina.index.store import IndexStore
from vitrina.search import (
    DUPLICATE_COSINE,
    MAX_TERMS,
    QUERY_PATTERN,
    TERMS_PATTERN,
    Query,
    Searcher,
    Term,
    UnknownItemError,
    encode_images,
    parse_query,
)

# --- the language: patterns against a naive reader ---------------------------------------------

SEPARATORS = " \t\n\r"


def naive_tokens(query: str) -> list[str] | None:
    """Split at separators, a quoted phrase read whole; None for an unclosed quote."""
    tokens, i = [], 0
    while i < len(query):
        if query[i] in SEPARATORS:
            i += 1
            continue
        start = i
        if query[i] == "-":
            i += 1
        if i < len(query) and query[i] == '"':
            close = query.find('"', i + 1)
            if close < 0:
                return None
            i = close + 1
        while i < len(query) and query[i] not in SEPARATORS:
            i += 1
        tokens.append(query[start:i])
    return tokens


def naive_weight(text: str) -> float | None:
    """A decimal within ±10 without superfluous leading zeros (``0.5``, ``.5``, ``-2``, ``10.0``), else None."""
    if not re.fullmatch(r"[+-]?(\d+(\.\d+)?|\.\d+)", text) or re.match(r"[+-]?0\d", text):
        return None
    return float(text) if abs(float(text)) <= 10 else None


def naive_accepts(query: str, require_positive: bool) -> bool:
    """The rules of ``vitrina.search`` read one by one, with no regular expression doing the work."""
    tokens = naive_tokens(query)
    if tokens is None:
        return False
    marked, positive = 0, False
    for token in tokens:
        negative = token.startswith("-")
        body = token[1:] if negative else token
        weight_text = None
        if body.startswith('"'):
            close = body.index('"', 1)
            text, rest = body[1:close], body[close + 1 :]
            if rest:
                if not rest.startswith("^"):
                    return False
                weight_text = rest[1:]
        else:
            text, _, weight_text = body.partition("^") if "^" in body else (body, "", None)
            if not text or text[0] == "-" or '"' in text or (weight_text is not None and "^" in weight_text):
                return False
        weight = 1.0
        if weight_text is not None:
            weight = naive_weight(weight_text)
            if weight is None:
                return False
        marked += negative or body.startswith('"') or weight_text is not None
        if not negative and weight > 0 and text.strip(SEPARATORS):
            positive = True
    return marked <= MAX_TERMS and (positive or not require_positive)


WORDS = ["a", "beach", "x-ray", "0", "é", "--", "-", "a^b", 'ab"c']
PHRASES = ['"red umbrella"', '"  "', '""', '"a -b"', '"unclosed']
WEIGHTS = ["0", "0.5", ".5", "1.", "01", "9.99", "10", "10.0", "10.01", "11", "-2", "+3", "-0", "1e1", ""]


@st.composite
def queries(draw) -> str:
    """Strings near the language: terms from grammar pieces, odd ones mixed in, and separators."""
    term = st.tuples(
        st.sampled_from(["", "", "-"]),
        st.one_of(st.sampled_from(WORDS + PHRASES), st.text(alphabet='-"^0123456789.+ab', min_size=1, max_size=3)),
        st.one_of(st.just(""), st.sampled_from(WEIGHTS).map(lambda w: "^" + w)),
    ).map("".join)
    terms = draw(st.lists(term, max_size=20))
    return "".join(t + draw(st.sampled_from(["", " ", "  ", "\t", "\n", " \r\n"])) for t in terms)


ECMA = {  # the dialect of JSON Schema validators
    name: jsonschema_rs.validator_for({"type": "string", "pattern": pattern})
    for name, pattern in [("q", QUERY_PATTERN), ("t", TERMS_PATTERN)]
}


@settings(max_examples=400, deadline=None)
@given(queries())
def test_the_patterns_accept_exactly_what_the_rules_allow(query: str) -> None:
    for name, pattern, require_positive in [("q", QUERY_PATTERN, True), ("t", TERMS_PATTERN, False)]:
        expected = naive_accepts(query, require_positive)
        assert bool(re.fullmatch(pattern, query)) == expected, (query, require_positive)
        assert ECMA[name].is_valid(query) == expected, (query, "ECMA", require_positive)
        if expected:
            terms = parse_query(query, require_positive=require_positive)
            assert all(t.text and t.weight != 0 and abs(t.weight) <= 10 for t in terms)
        else:
            with pytest.raises(UserError, match="^query: "):
                parse_query(query, require_positive=require_positive)


def test_the_term_limit_counts_marked_terms() -> None:
    marked = " ".join(f"-w{i}" for i in range(MAX_TERMS))
    assert len(parse_query(f"plain words {marked}")) == MAX_TERMS + 1
    with pytest.raises(UserError, match=f"17 quoted, negative or weighted terms; at most {MAX_TERMS}"):
        parse_query(f"plain {marked} -one-more")


def test_with_an_image_the_text_may_only_push_away() -> None:
    assert parse_query("-people", require_positive=False) == [Term("people", -1.0)]
    assert parse_query("  ", require_positive=False) == []
    with pytest.raises(UserError, match="needs at least one positive term"):
        parse_query("-people")


# --- Searcher.run over a real tiny index --------------------------------------------------------


@pytest.fixture(scope="module")
def encoder():
    return make_encoder()


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, encoder) -> Path:
    root = tmp_path_factory.mktemp("query") / "photos"
    write_collection(root, variants=2, captions=True)  # 3 colours x 4 shapes x 2 variants
    shutil.copyfile(image_path(root, "red", "circle-0"), root / "red" / "circle-0-copy.png")
    out = root.parent / "index"
    index_folder(root, encoder, out, model_ref="clip-tiny", progress=False, workers=0)
    return out


@pytest.fixture(scope="module")
def stored(index_dir: Path) -> dict:
    with IndexStore.open(index_dir) as store:
        ids, vectors = store.all_vectors()
        root = store.root
        by_path = {path: item_id for item_id, path, _, _ in store.items()}
    return {"ids": ids, "vectors": vectors, "root": root, "by_path": by_path}


def text_vector(encoder, text: str) -> np.ndarray:
    return encoder.encode_text([text])[0].detach().numpy()


def assert_ranked(stored: dict, ids: list[int], query: np.ndarray, k: int) -> None:
    """``ids`` are a top-``k`` by inner product with ``query`` over the stored vectors (ties in any order)."""
    scores = dict(zip(stored["ids"].tolist(), (stored["vectors"] @ query).tolist(), strict=True))  # id -> score
    assert len(set(ids)) == len(ids) == k
    assert [scores[i] for i in ids] == pytest.approx(sorted(scores.values(), reverse=True)[:k], abs=1e-5)


def test_run_ranks_by_the_weighted_sum_of_text_and_image_terms(index_dir, stored, encoder) -> None:
    example = image_path(stored["root"], "green", "square-1")
    query = Query(terms=parse_query('a red circle -"blue square"^0.5'), images=[(example, 0.5)], k=8)
    with Searcher(index_dir, encoder) as searcher:
        results = searcher.run(query)
    combined = (
        text_vector(encoder, "a red circle")
        - 0.5 * text_vector(encoder, "blue square")
        + 0.5 * encode_images([example], encoder)[0]
    )
    assert_ranked(stored, [r.hit.id for r in results.hits], combined, 8)
    assert results.count == 25 and not results.cancelled and all(r.duplicates == [] for r in results.hits)


def test_run_folds_an_exact_copy_and_knows_unknown_ids(index_dir, stored, encoder) -> None:
    original = stored["by_path"][str(image_path(stored["root"], "red", "circle-0"))]
    copy = stored["by_path"][str(stored["root"] / "red" / "circle-0-copy.png")]
    with Searcher(index_dir, encoder) as searcher:
        plain = searcher.run(Query(item_ids=[(copy, 1.0)], k=3))
        folded = searcher.run(Query(item_ids=[(copy, 1.0)], k=3, collapse=True))
        with pytest.raises(UnknownItemError, match="image_id 999999 is not in the index"):
            searcher.run(Query(item_ids=[(999999, 1.0)]))
    assert {r.hit.id for r in plain.hits[:2]} == {original, copy}
    first = folded.hits[0]
    assert {first.hit.id, *first.duplicates} >= {original, copy} and 1 <= len(folded.hits) <= 3
    # Folded items are within the threshold of the hit they were folded into; shown ones are not.
    vector = {int(i): v for i, v in zip(stored["ids"], stored["vectors"], strict=True)}
    for ranked in folded.hits:
        assert all(vector[ranked.hit.id] @ vector[d] >= DUPLICATE_COSINE - 1e-6 for d in ranked.duplicates)
    shown = [r.hit.id for r in folded.hits]
    assert all(vector[a] @ vector[b] < DUPLICATE_COSINE for i, a in enumerate(shown) for b in shown[i + 1 :])


def test_terms_that_cancel_out_match_nothing(index_dir, encoder) -> None:
    with Searcher(index_dir, encoder) as searcher:
        results = searcher.run(Query(terms=parse_query("a cat -cat"), k=5))  # "a cat" is not "cat"
        assert results.hits and not results.cancelled
        results = searcher.run(Query(terms=parse_query("cat -cat"), k=5))
    assert results.cancelled and results.hits == [] and results.count == 25


# --- vitrina search -----------------------------------------------------------------------------


def search_json(capsys, *args: str) -> list[dict]:
    assert cli(["search", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_not_pushes_away(index_dir, stored, encoder, capsys) -> None:
    hits = search_json(capsys, str(index_dir), "a red circle", "--not", "blue square", "--not", "green", "-k", "6")
    combined = (
        text_vector(encoder, "a red circle") - text_vector(encoder, "blue square") - text_vector(encoder, "green")
    )
    assert_ranked(stored, [h["id"] for h in hits], combined, 6)
    assert set(hits[0]) == {"id", "path", "score", "label", "caption", "duplicates"}
    assert all(h["duplicates"] == [] for h in hits)


def test_cli_reads_the_query_language_as_the_api_does(index_dir, stored, encoder, capsys) -> None:
    hits = search_json(capsys, str(index_dir), 'red circle -"blue square"^0.5 green^0.25', "-k", "10")
    combined = (
        text_vector(encoder, "red circle")
        - 0.5 * text_vector(encoder, "blue square")
        + 0.25 * text_vector(encoder, "green")
    )
    assert_ranked(stored, [h["id"] for h in hits], combined, 10)
    unit = combined / np.linalg.norm(combined)
    top = stored["vectors"][list(stored["ids"]).index(hits[0]["id"])]
    assert hits[0]["score"] == pytest.approx(float(top @ unit), abs=1e-4)
    assert cli(["search", str(index_dir), '"unclosed']) == 2
    assert 'query: a quote (") is not closed' in capsys.readouterr().err
    assert cli(["search", str(index_dir), "cat^99"]) == 2
    assert "between -10 and 10" in capsys.readouterr().err


def test_cli_mixes_an_image_with_text_and_collapses_its_copy(index_dir, stored, encoder, capsys) -> None:
    original = image_path(stored["root"], "red", "circle-0")
    copy = stored["root"] / "red" / "circle-0-copy.png"
    ids = {stored["by_path"][str(original)], stored["by_path"][str(copy)]}
    hits = search_json(capsys, str(index_dir), "--image", str(copy), "-k", "3")
    assert {h["id"] for h in hits[:2]} == ids
    hits = search_json(capsys, str(index_dir), "--image", str(copy), "-k", "3", "--collapse")
    assert {hits[0]["id"], *hits[0]["duplicates"]} >= ids and not {h["id"] for h in hits[1:]} & ids
    mixed = search_json(capsys, str(index_dir), "a blue bar", "--image", str(copy), "--image-weight", "0.5", "-k", "5")
    combined = text_vector(encoder, "a blue bar") + 0.5 * encode_images([copy], encoder)[0]
    assert_ranked(stored, [h["id"] for h in mixed], combined, 5)
    # The table names what was folded; text that only pushes away is fine beside an image.
    assert cli(["search", str(index_dir), "--image", str(copy), "--not", "blue", "-k", "2", "--collapse"]) == 0
    assert "near-duplicate(s)" in capsys.readouterr().out


def test_cli_says_when_the_terms_cancel_out_and_what_is_missing(index_dir, capsys) -> None:
    assert search_json(capsys, str(index_dir), "cat", "--not", "cat") == []
    assert cli(["search", str(index_dir), "cat", "--not", "cat"]) == 0
    assert "the terms cancel each other out" in capsys.readouterr().err
    assert cli(["search", str(index_dir)]) == 2
    assert "give a text query or --image PATH" in capsys.readouterr().err
    assert cli(["search", str(index_dir), "cat", "--image", "x.png", "--image-weight", "11"]) == 2
    assert "--image-weight 11.0: must be within ±10" in capsys.readouterr().err


def test_the_results_table_keeps_every_path_whole_and_shows_caption_and_label_apart(tmp_path, monkeypatch):
    """A narrow terminal folds a long path onto more lines instead of cutting off its file name; a path
    below the working directory is shown relative to it; caption and label each get their own column."""
    from rich.console import Console

    from vitrina.cli import _print_hits
    from vitrina.index.store import Hit

    monkeypatch.chdir(tmp_path)
    deep = tmp_path / "collections" / "emoji-facebook" / "animals_and_nature" / "1f431-cat-face-long-name.png"
    elsewhere = "/elsewhere/photos/2024/beach.jpg"
    hits = [
        Hit(1, str(deep), 0.43, "animals and nature", "an emoji of a cat face"),
        Hit(2, elsewhere, 0.38, None, None),
    ]
    console = Console(width=60, record=True, emoji=False, markup=False, highlight=False)
    _print_hits(hits, console=console)
    text = console.export_text()
    header, *rows = text.splitlines()
    assert header.split() == ["rank", "┃", "score", "┃", "caption", "┃", "label", "┃", "path"]
    # read each column of the table back by its cells, the folded lines joined
    cells: list[list[str]] = []
    words = {2, 3}  # caption and label wrap between words; a path folds within itself
    for line in rows[1:]:  # past the header rule
        parts = [part.strip() for part in line.split("│")]
        if parts[0]:  # a new row starts with its rank
            cells.append(parts)
            continue
        joined = zip(cells[-1], parts, strict=True)
        cells[-1] = [a + (" " if a and b and i in words else "") + b for i, (a, b) in enumerate(joined)]
    assert [row[0] for row in cells] == ["1", "2"]
    assert cells[0][4] == "collections/emoji-facebook/animals_and_nature/1f431-cat-face-long-name.png"
    assert cells[1][4] == elsewhere
    assert cells[0][2] == "an emoji of a cat face" and cells[0][3] == "animals and nature"
    assert cells[1][2] == cells[1][3] == ""
