"""``pipemend.configfile``: one reader and writer of dotted keys in YAML, JSON and TOML, lists included."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import yaml

from pipemend.configfile import (
    ConfigFileError,
    config_format,
    get_dotted,
    lookup,
    parse_config,
    read_config_file,
    set_config_value,
    with_value,
)

YAML_TEXT = """\
# retrievers, tried in order
retrievers:
  - name: bm25     # lexical
    top_k: 3
  - {name: dense, top_k: 5}
hops: [1, 2]
generation:
  style: sentence  # sentence | short
  notes: |
    a block
anchored: &k 4
alias: *k
"""


def test_lookup_walks_mappings_and_list_indices() -> None:
    data = parse_config(YAML_TEXT, "yaml")
    assert lookup(data, "retrievers.0.top_k") == (True, 3)
    assert lookup(data, "retrievers.1.name") == (True, "dense")
    assert lookup(data, "hops.1") == (True, 2)
    assert lookup(data, "retrievers.2.top_k") == (False, None)
    assert lookup(data, "retrievers.x") == (False, None)
    assert lookup(data, "hops.-1") == (False, None)
    assert lookup({1: "int key"}, "1") == (True, "int key")
    assert get_dotted(data, "generation.style") == "sentence"
    assert get_dotted(data, "generation.tone", None) is None
    with pytest.raises(ConfigFileError, match="'generation.tone' not found"):
        get_dotted(data, "generation.tone")


def test_with_value_sets_through_lists_and_refuses_a_missing_index() -> None:
    data = {"a": [{"b": 1}, {"b": 2}]}
    assert with_value(data, "a.1.b", 9) == {"a": [{"b": 1}, {"b": 9}]}
    assert data == {"a": [{"b": 1}, {"b": 2}]}  # a copy
    assert with_value(data, "c.d", 1) == {"a": [{"b": 1}, {"b": 2}], "c": {"d": 1}}
    with pytest.raises(ConfigFileError, match="not an index"):
        with_value(data, "a.5.b", 1)


@pytest.mark.parametrize(
    ("key", "value", "old_line", "new_line"),
    [
        ("retrievers.0.top_k", 8, "    top_k: 3", "    top_k: 8"),
        ("retrievers.0.name", "x y", "  - name: bm25     # lexical", "  - name: x y     # lexical"),
        ("retrievers.1.top_k", 7, "  - {name: dense, top_k: 5}", "  - {name: dense, top_k: 7}"),
        ("hops.0", 3, "hops: [1, 2]", "hops: [3, 2]"),
        ("hops", [4], "hops: [1, 2]", "hops: [4]"),
        ("generation.style", "short", "  style: sentence  # sentence | short", "  style: short  # sentence | short"),
    ],
)
def test_yaml_edits_touch_one_value_and_keep_comments(key, value, old_line, new_line) -> None:
    new = set_config_value(YAML_TEXT, "yaml", key, value)
    assert new == YAML_TEXT.replace(old_line, new_line, 1)
    assert get_dotted(yaml.safe_load(new), key) == value


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("retrievers", "block"),
        ("generation.notes", "block"),
        ("anchored", "anchored"),
        ("alias", "anchored"),
        ("retrievers.2.top_k", "not found"),
        ("nope", "not found"),
    ],
)
def test_yaml_edits_that_are_refused(key, message) -> None:
    with pytest.raises(ConfigFileError, match=message):
        set_config_value(YAML_TEXT, "yaml", key, 1)


def test_toml_edits_in_inline_arrays_and_arrays_of_tables() -> None:
    text = '[retrieval]\ntop_k = [3, 5]  # per hop\n\n[[servers]]\nport = 1\n\n[[servers]]\nport = 2  # second\n'
    new = set_config_value(text, "toml", "retrieval.top_k.1", 8)
    assert "top_k = [3, 8]  # per hop" in new and tomllib.loads(new)["servers"] == [{"port": 1}, {"port": 2}]
    new = set_config_value(text, "toml", "servers.1.port", 9)
    assert "port = 9  # second" in new and tomllib.loads(new)["servers"] == [{"port": 1}, {"port": 9}]
    with pytest.raises(ConfigFileError, match="not found"):
        set_config_value(text, "toml", "servers.2.port", 9)


def test_json_edits_through_lists() -> None:
    text = '{\n  "retrievers": [{"top_k": 3}, {"top_k": 5}]\n}\n'
    new = set_config_value(text, "json", "retrievers.1.top_k", 6)
    assert json.loads(new) == {"retrievers": [{"top_k": 3}, {"top_k": 6}]} and new.endswith("}\n")


def test_reading_files_by_extension(tmp_path: Path) -> None:
    (tmp_path / "a.yml").write_text("a: [1]\n")
    (tmp_path / "b.toml").write_text("b = 1\n")
    (tmp_path / "c.ini").write_text("[c]\n")
    (tmp_path / "d.yaml").write_text("d: [unclosed\n")
    assert read_config_file(tmp_path / "a.yml") == {"a": [1]} and read_config_file(tmp_path / "b.toml") == {"b": 1}
    assert config_format("x/y.JSON") == "json"
    with pytest.raises(ConfigFileError, match="unsupported config format '.ini'"):
        read_config_file(tmp_path / "c.ini")
    with pytest.raises(ConfigFileError, match="not valid yaml"):
        read_config_file(tmp_path / "d.yaml")
