import json

from almost_utils.artifacts import read_jsonl

KEYS = {"query_id", "prompt", "chosen", "rejected", "chosen_config", "rejected_config"}


def test_notebook01_runs_on_tiny(tiny_run):
    comp = tiny_run / "comparisons"
    pairs = read_jsonl(comp / "pairs.jsonl")
    assert pairs and all(set(p) == KEYS for p in pairs)
    assert len(pairs) <= len(read_jsonl(comp / "pairs_no_hf.jsonl"))
    for fig in ("response_lengths.png", "bad_rates.png"):
        assert (comp / fig).stat().st_size > 1000
    for stage in ("queries", "comparisons"):
        man = json.loads((tiny_run / stage / "manifest.json").read_text())
        assert man["seed"] == 1234 and man["versions"]["torch"] and man["timings_s"]["total"] > 0
    nb = json.loads((tiny_run / "notebooks" / "01_synthetic_comparisons.ipynb").read_text())
    errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
