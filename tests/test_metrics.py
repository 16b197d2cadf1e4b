from __future__ import annotations


import pytest

from pipemend.errors import ConfigError
from pipemend.metrics import (
    METRIC_ERROR_PREFIX,
    Metric,
    contains,
    exact_match,
    extract_json_object,
    f1,
    json_match,
    load_metric,
    metric_fingerprint,
    normalize_answer,
)


# --------------------------------------------------------------------------- normalization and built-ins


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  a   cat,  an OWL and the dog. ", "cat owl and dog"),
        ("theatre", "theatre"),  # articles only as whole words
        ("U.S.A.", "usa"),
        ("", ""),
        ("\tNew\nYork ", "new york"),
    ],
)
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match_normalizes_and_takes_best_of_a_list():
    assert exact_match("The Paris.", "paris") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0
    assert exact_match("NYC", ["New York City", "nyc"]) == 1.0
    assert exact_match("Boston", ["New York City", "nyc"]) == 0.0
    assert exact_match(None, "x") == 0.0


def test_f1_partial_overlap_and_lists():
    assert f1("the big red barn", "red barn") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert f1("nothing shared", "red barn") == 0.0
    assert f1("red barn", ["blue", "red barn"]) == 1.0
    assert f1("", "") == 1.0
    assert f1("something", "") == 0.0


def test_contains_is_on_word_boundaries():
    assert contains("The answer is Paris, of course.", "paris") == 1.0
    assert contains("Parisian cafes", "paris") == 0.0
    assert contains("it was 1969 or so", ["1970", "1969"]) == 1.0


def test_dict_outputs_are_scored_on_their_answer_key():
    assert exact_match({"answer": "Paris", "reasoning": "capital"}, "paris") == 1.0
    assert contains({"answer": "Paris, France"}, "france") == 1.0
    assert exact_match({"city": "Paris"}, "paris") == 0.0  # no "answer": scored as its JSON text


def test_json_match_fenced_partial_and_alternatives():
    text = 'Here you go:\n```json\n{"city": "Paris", "country": "France", "pop": 2.1}\n```\nDone.'
    assert extract_json_object(text) == {"city": "Paris", "country": "France", "pop": 2.1}
    assert json_match(text, {"city": "paris", "country": "France"}) == 1.0
    assert json_match(text, {"city": "Paris", "country": "Spain"}) == 0.5
    assert json_match(text, {"city": "Paris", "pop": 2.1, "x": 1, "y": 2}) == 0.5
    assert json_match({"a": 1}, [{"a": 2}, {"a": 1}]) == 1.0
    assert json_match('prefix {"a": [1, 2]} suffix', {"a": [1, 2]}) == 1.0
    assert json_match('{"a": true}', '{"a": true}') == 1.0  # expected given as JSON text
    assert json_match('{"a": 1}', {"a": True}) == 0.0  # a bool is not a number
    assert json_match("no json here", {"a": 1}) == 0.0
    assert json_match('{"a": 1}', {}) == 1.0


# --------------------------------------------------------------------------- loading


def test_load_builtin_by_name(tmp_path):
    m = load_metric("exact_match", tmp_path)
    assert m("The Paris", "paris", {"id": "x"}) == 1.0


def test_unknown_metric_lists_the_builtins(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_metric("bleu", tmp_path)
    msg = str(e.value)
    assert "unknown metric 'bleu'" in msg
    for name in ("exact_match", "f1", "contains", "json_match"):
        assert name in msg


def test_custom_metric_with_two_and_three_args(tmp_path):
    (tmp_path / "helpers_mod.py").write_text("PREFIX = 'ans:'\n")
    (tmp_path / "scoring_fns.py").write_text(
        "from helpers_mod import PREFIX\n"
        "def two(output, expected):\n"
        "    return float(output == PREFIX + expected)\n"
        "def three(output, expected, example):\n"
        "    return float(example['inputs']['q'] in output)\n"
    )
    two = load_metric("scoring_fns.py:two", tmp_path)
    three = load_metric("scoring_fns.py:three", tmp_path)
    assert (two.takes_example, three.takes_example) == (False, True)
    assert two("ans:7", "7", {"inputs": {}}) == 1.0
    assert three("what is 7", "7", {"inputs": {"q": "what"}}) == 1.0
    assert three("no", "7", {"inputs": {"q": "what"}}) == 0.0


def test_missing_file_and_function_name_both(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_metric("nope.py:score", tmp_path)
    assert "nope.py" in str(e.value) and "score" in str(e.value)
    (tmp_path / "m.py").write_text("def other(o, e):\n    return 1.0\n")
    with pytest.raises(ConfigError) as e:
        load_metric("m.py:score", tmp_path)
    assert "m.py" in str(e.value) and "'score'" in str(e.value)


def test_bad_custom_metric_files_are_config_errors(tmp_path):
    (tmp_path / "broken.py").write_text("def score(o, e):\n    return (\n")
    with pytest.raises(ConfigError, match="fails to import"):
        load_metric("broken.py:score", tmp_path)
    (tmp_path / "one.py").write_text("def score(o):\n    return 1.0\n")
    with pytest.raises(ConfigError, match="signature"):
        load_metric("one.py:score", tmp_path)
    with pytest.raises(ConfigError, match="outside"):
        load_metric("../elsewhere.py:score", tmp_path / "sub")


def test_custom_metric_is_loaded_from_the_given_folder_only(tmp_path):
    frozen, candidate = tmp_path / "frozen", tmp_path / "cand"
    for d, value in ((frozen, "0.25"), (candidate, "1.0")):
        d.mkdir()
        (d / "metric.py").write_text(f"def score(o, e):\n    return {value}\n")
    assert load_metric("metric.py:score", frozen)("x", "y") == 0.25
    assert load_metric("metric.py:score", candidate)("x", "y") == 1.0


def test_safe_turns_raising_and_out_of_range_metrics_into_errors(tmp_path):
    (tmp_path / "m.py").write_text(
        "def boom(o, e):\n    raise ValueError('bad row')\n"
        "def big(o, e):\n    return 1.5\n"
        "def nan(o, e):\n    return float('nan')\n"
        "def text(o, e):\n    return 'high'\n"
        "def boolean(o, e):\n    return o == e\n"
    )
    score, err = load_metric("m.py:boom", tmp_path).safe("a", "b")
    assert score == 0.0 and err.startswith(METRIC_ERROR_PREFIX) and "ValueError: bad row" in err
    for name in ("big", "nan", "text"):
        score, err = load_metric(f"m.py:{name}", tmp_path).safe("a", "b")
        assert score == 0.0 and err.startswith(METRIC_ERROR_PREFIX), name
    assert load_metric("m.py:boolean", tmp_path).safe("a", "a") == (1.0, None)


def test_plain_callable_arity_is_detected():
    assert Metric("lambda", lambda o, e: 1.0)("x", "y", {"id": "1"}) == 1.0
    assert Metric("lambda", lambda o, e, ex: float(ex["id"] == "1"))("x", "y", {"id": "1"}) == 1.0


# --------------------------------------------------------------------------- fingerprints


def test_fingerprint_of_a_custom_metric_keeps_distinctive_lines(tmp_path):
    (tmp_path / "m.py").write_text(
        "import re\n"
        "from collections import Counter\n"
        "# a comment that is long enough to count\n"
        "def score(output, expected):\n"
        "    cleaned = re.sub(r'[^a-z0-9]+', ' ', output.lower())\n"
        "    return float(cleaned.strip() == expected)\n"
        "    pass\n"
    )
    lines = metric_fingerprint("m.py:score", tmp_path)
    assert lines == [
        "def score(output, expected):",
        "cleaned = re.sub(r'[^a-z0-9]+', ' ', output.lower())",
        "return float(cleaned.strip() == expected)",
    ]


def test_fingerprint_of_builtins_is_their_normalization_regex(tmp_path):
    lines = metric_fingerprint("exact_match", tmp_path)
    assert r"\b(a|an|the)\b" in lines
