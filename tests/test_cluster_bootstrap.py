"""Cluster (block) bootstrap intervals: pairs of one conversation / query are resampled together."""
import subprocess
import sys
import time

import numpy as np
import pytest

from almost_utils import rm_eval
from almost_utils.bigbench import hhh_cluster, load_hhh
from almost_utils.reward_stage import clusters_of
from conftest import ROOT

FIXTURE = ROOT / "data" / "fixtures" / "bigbench"        # the recipe-data HHH fixture (7 pairs)


def width(ci) -> float:
    return ci[1] - ci[0]


def agreeing_clusters(n_clusters=20, size=10, right=12):
    """``right`` clusters where every pair is right, the others all wrong: outcomes agree inside a cluster."""
    correct = np.repeat([1.0] * right + [0.0] * (n_clusters - right), size)
    clusters = np.repeat([f"c{i}" for i in range(n_clusters)], size)
    return correct, list(clusters)


# --------------------------------------------------------------------------- bootstrap_ci
def test_cluster_interval_is_wider_when_a_cluster_agrees():
    correct, clusters = agreeing_clusters()
    pairwise = rm_eval.bootstrap_ci(correct, 1000, seed=0)
    clustered = rm_eval.bootstrap_ci(correct, 1000, seed=0, clusters=clusters)
    # 200 pairs but really 20 independent outcomes: about sqrt(10) times wider
    assert width(clustered) > 2.5 * width(pairwise)
    assert clustered[0] < 0.6 < clustered[1]
    # a resample holds whole clusters, so the mean is a multiple of 1/20
    assert clustered[0] * 20 == pytest.approx(round(clustered[0] * 20))


def test_singleton_clusters_agree_with_the_pairwise_bootstrap():
    x = np.random.default_rng(5).binomial(1, 0.65, size=300).astype(float)
    plain = rm_eval.bootstrap_ci(x, 1000, seed=1)
    keys = [f"pair-{i}" for i in np.random.default_rng(2).permutation(300)]     # arbitrary labels, size 1 each
    assert rm_eval.bootstrap_ci(x, 1000, seed=1, clusters=keys) == pytest.approx(plain)
    other_seed = rm_eval.bootstrap_ci(x, 1000, seed=9, clusters=keys)
    assert other_seed == pytest.approx(plain, abs=0.03)
    # independent pairs grouped at random in twos: still about the pairwise width
    pairs_of_two = list(np.random.default_rng(3).permutation(np.repeat(np.arange(150), 2)))
    assert width(rm_eval.bootstrap_ci(x, 2000, seed=1, clusters=pairs_of_two)) == pytest.approx(width(plain), rel=0.25)


def test_bootstrap_is_deterministic_under_a_seed():
    correct, clusters = agreeing_clusters()
    a = rm_eval.bootstrap_ci(correct, 500, seed=4, clusters=clusters)
    assert a == rm_eval.bootstrap_ci(correct, 500, seed=4, clusters=clusters)
    x = np.random.default_rng(0).random(200)
    keys = np.random.default_rng(1).integers(0, 40, 200)
    assert rm_eval.bootstrap_ci(x, 500, seed=4, clusters=keys) != rm_eval.bootstrap_ci(x, 500, seed=5, clusters=keys)


def test_cluster_keys_must_match_the_pairs():
    with pytest.raises(ValueError, match="clusters: 3 keys for 4 pairs"):
        rm_eval.bootstrap_ci([1, 0, 1, 1], clusters=["a", "a", "b"])


def test_thousand_resamples_stay_fast():
    x = np.random.default_rng(0).binomial(1, 0.6, 5000).astype(float)
    keys = np.random.default_rng(1).integers(0, 500, 5000)
    t0 = time.perf_counter()
    rm_eval.bootstrap_ci(x, 1000, seed=0, clusters=keys)
    assert time.perf_counter() - t0 < 2.0          # vectorised: a few milliseconds normally


# --------------------------------------------------------------------------- summaries and differences
def test_summarize_reports_clusters():
    correct, clusters = agreeing_clusters()
    s = rm_eval.summarize(correct, 300, 0, clusters=clusters)
    assert (s["n"], s["clusters"], s["accuracy"]) == (200, 20, pytest.approx(0.6))
    assert rm_eval.summarize(correct, 300, 0)["clusters"] == 200


def test_paired_difference_resamples_clusters_for_both_scorers():
    correct, clusters = agreeing_clusters(right=10)
    # b is a shifted by one flip in each of the first 10 clusters: a large between-cluster spread,
    # a small, steady per-pair difference
    b = correct.copy()
    b[::10][:10] = 0.0
    d = rm_eval.paired_difference(correct, b, 1000, 0, clusters=clusters)
    assert d["difference"] == pytest.approx(0.05) and d["clusters"] == 20
    assert 0 < d["ci_low"] <= 0.05 <= d["ci_high"] < 0.1
    assert width(rm_eval.bootstrap_ci(correct, 1000, 0, clusters=clusters)) > 0.3      # unpaired: wide
    # a difference that is whole clusters wide is wider by cluster than by pair
    diff = np.repeat([1.0] * 6 + [0.0] * 14, 10)
    zeros = np.zeros(200)
    by_cluster = rm_eval.paired_difference(diff, zeros, 1000, 0, clusters=clusters)
    by_pair = rm_eval.paired_difference(diff, zeros, 1000, 0)
    assert width((by_cluster["ci_low"], by_cluster["ci_high"])) > 2.5 * width((by_pair["ci_low"], by_pair["ci_high"]))
    same = rm_eval.paired_difference(correct, correct, 500, 0, clusters=clusters)
    assert (same["ci_low"], same["ci_high"]) == (0.0, 0.0)


def test_accuracy_rows_use_the_subsets_clusters():
    # category x: 10 conversations of 10 pairs judged alike; category y: 100 independent pairs
    rng = np.random.default_rng(0)
    x_correct = np.repeat(rng.binomial(1, 0.5, 10), 10).astype(bool)
    y_correct = rng.binomial(1, 0.5, 100).astype(bool)
    rows = ([{"category": "x", "conv": f"x{i // 10}", "chosen": "a", "rejected": "b"} for i in range(100)]
            + [{"category": "y", "conv": f"y{i}", "chosen": "a", "rejected": "b"} for i in range(100)])
    correct = np.concatenate([x_correct, y_correct])
    scores = {"rm": (correct.astype(float), np.zeros(200) + 0.5)}
    keys = [r["conv"] for r in rows]
    out = rm_eval.accuracy_rows("b", rows, scores, group_key="category", n_samples=1000, seed=0, clusters=keys)
    get = {(r["subset"], r["scorer"]): r for r in out}
    assert [get[(s, "rm")]["clusters"] for s in ("all", "x", "y")] == [110, 10, 100]
    rm_x = get[("x", "rm")]
    expected = rm_eval.bootstrap_ci(x_correct.astype(float), 1000, 0, clusters=keys[:100])
    assert (rm_x["ci_low"], rm_x["ci_high"]) == expected
    assert width(expected) > 2 * width(rm_eval.bootstrap_ci(x_correct.astype(float), 1000, 0))
    rm_y = get[("y", "rm")]
    assert (rm_y["ci_low"], rm_y["ci_high"]) == rm_eval.bootstrap_ci(y_correct.astype(float), 1000, 0)
    # the coin stays binomial: flips are independent per pair whatever the conversation
    coin = get[("x", "random")]
    assert (coin["ci_low"], coin["ci_high"]) == rm_eval.chance_interval(100, 1000, 0)
    assert coin["clusters"] == 10
    plain = rm_eval.accuracy_rows("b", rows, scores, group_key="category", n_samples=1000, seed=0)
    assert {(r["subset"], r["scorer"]): r["clusters"] for r in plain}[("x", "rm")] == 100


# --------------------------------------------------------------------------- cluster keys of the benchmarks
def test_hhh_pairs_carry_their_conversation():
    pairs = load_hhh(FIXTURE)
    assert all(len(p["cluster"]) == 12 for p in pairs)
    assert pairs[0]["cluster"] == hhh_cluster(pairs[0]["history"])
    assert hhh_cluster([("Human", "hi")]) != hhh_cluster([("Human", "hi"), ("Assistant", "yo"), ("Human", "hi")])
    assert clusters_of("hhh", pairs) == [p["cluster"] for p in pairs]


@pytest.mark.skipif(not (ROOT / "data" / "bigbench" / "hhh_alignment" / "helpful" / "task.json").is_file(),
                    reason="BIG-bench HHH not cached")
def test_real_hhh_has_about_a_hundred_conversations():
    pairs = load_hhh(ROOT / "data" / "bigbench")
    keys = clusters_of("hhh", pairs)
    assert len(pairs) == 221 and len(set(keys)) == 102
    assert max(keys.count(k) for k in set(keys)) == 15


def test_heldout_pairs_cluster_by_query():
    rows = [{"id": "a", "query_id": 3}, {"id": "b", "query_id": 3}, {"id": "c", "query_id": 7}]
    assert clusters_of("heldout", rows) == [3, 3, 7]
    with pytest.raises(KeyError, match="pair x lacks 'cluster'"):
        clusters_of("hhh", [{"id": "x", "input": "hi"}])


# --------------------------------------------------------------------------- figures and report
def test_rm_figures_does_not_import_reward_stage():
    code = "import sys, almost_utils.rm_figures, almost_utils.rm_report; print('almost_utils.reward_stage' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _metrics():
    pairs = load_hhh(FIXTURE)
    n = len(pairs)
    scores = {"rm": ([1.0] * n, [0.0] * (n - 1) + [2.0]), "untrained": ([0.0] * n, [0.0] * n)}
    keys = clusters_of("hhh", pairs)
    acc = rm_eval.accuracy_rows("hhh", pairs, scores, group_key="category", n_samples=200, seed=0, clusters=keys)
    correct = {k: rm_eval.pair_correct(*v) for k, v in scores.items()}
    paired = {"rm_minus_untrained": rm_eval.paired_difference(correct["rm"], correct["untrained"], 200, 0,
                                                              clusters=keys)}
    return pairs, {"accuracy": acc, "training": {"rm": {"train_pairs": 10}}, "paired": {"hhh": paired},
                   "ablation": {"table": [{"variant": "rm", "train_pairs": 10}]}}


def test_make_figures_takes_loaded_results(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from almost_utils import rm_figures
    pairs, metrics = _metrics()
    table = [{"id": p["id"], "category": p["category"], "rm_chosen": 1.0, "rm_rejected": 0.0} for p in pairs]
    results = {"metrics": metrics, "training_log": {"rm": [{"step": 1, "loss": 0.7, "accuracy": 0.5}]},
               "hhh_scores": table, "heldout_scores": table[:3], "stage_dir": tmp_path}
    figs = rm_figures.make_figures(results)
    assert (tmp_path / "figures" / "hhh_accuracy.png").stat().st_size > 1000
    assert "cluster bootstrap" in figs["hhh_accuracy"].axes[0].get_title()
    for fig in figs.values():
        plt.close(fig)
    with pytest.raises(KeyError, match="stage_dir"):
        rm_figures.make_figures({k: v for k, v in results.items() if k != "stage_dir"})


def test_findings_name_the_number_of_conversations():
    from almost_utils import rm_report
    pairs, metrics = _metrics()
    text = rm_report.findings(metrics)
    n_conv = len({p["cluster"] for p in pairs})
    assert f"of {len(pairs)} pairs from {n_conv} conversations" in text
    assert "paired cluster bootstrap by conversation" in text
    assert "clusters)" in rm_report.accuracy_table(metrics, "hhh").index[0]
