"""`--lora-adapters` as TGI's launcher takes it, parsed in the web's settings (no files read)."""
from __future__ import annotations

import pytest

from common.adapters import parse_lora_adapters
from common.settings import Settings


def test_names_from_pairs_hub_ids_and_local_directories():
    specs = parse_lora_adapters("support=/srv/adapters/support-v2, predibase/dbpedia ,./adapters/legal/")
    assert [(s.name, s.source, s.is_local) for s in specs] == [
        ("support", "/srv/adapters/support-v2", True), ("predibase/dbpedia", "predibase/dbpedia", False),
        ("legal", "./adapters/legal/", True)]  # a local path is never shown: its last part names it


@pytest.mark.parametrize("value, message", [
    ("a=/x,a=/y", "'a' is named twice"),
    ("tgi=/x", "'tgi' is the base model's name"),
    ("tiny=/x", "'tiny' is the base model's name"),
    ("b=", "names no adapter path or id"),
])
def test_a_malformed_list_stops_the_start(value, message):
    with pytest.raises(ValueError, match=message):
        Settings(model_id="/models/tiny", lora_adapters=value)


def test_no_adapters_by_default():
    assert Settings().adapter_names == () and Settings(lora_adapters="").adapters == []
