"""benchmarks/loop_table.py: a loop job's per-round Dice split by subsets of its cases."""

import json

from benchmarks.loop_table import loop_table, subset_dice


def _case(case_id, rv, lv):
    return {"case_id": case_id, "classes": {"RV": {"dice": rv}, "LV": {"dice": lv}}}


def test_subset_dice_averages_per_class_over_the_subsets_volumes_then_over_classes():
    score = {"cases": [_case("a", 0.5, 1.0), _case("b", 0.7, 0.8), _case("c", 0.0, 0.0)]}
    assert subset_dice(score, {"a", "b"}) == 75.0  # RV 0.6, LV 0.9
    assert subset_dice(score, {"c"}) == 0.0
    assert subset_dice(score, {"nope"}) is None


def test_loop_table_reads_finished_rounds_only(tmp_path):
    for r, d in ((0, 0.5), (1, 0.9)):
        rdir = tmp_path / "rounds" / str(r)
        rdir.mkdir(parents=True)
        (rdir / "score.json").write_text(json.dumps({"cases": [_case("a", d, d), _case("b", 1.0, 1.0)]}))
        (rdir / "round.json").write_text("{}")
    (tmp_path / "rounds" / "2").mkdir()  # started, not finished: no round.json
    rows = loop_table(tmp_path, {"first": {"a"}, "both": {"a", "b"}})
    assert rows == [{"round": 0, "pseudo_first": 50.0, "pseudo_both": 75.0}, {"round": 1, "pseudo_first": 90.0, "pseudo_both": 95.0}]
