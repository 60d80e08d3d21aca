"""One evaluation record format (issue 22): every file that records attacks over a dataset is an
``EvalResult``; ``read_evaluation`` reads it back, the pipelines' older formats and the
committed results included."""

import json
from pathlib import Path

import pytest

from abnn.evaluation.results import SCHEMA_VERSION, read_evaluation
from conftest import record

DOCS = Path(__file__).resolve().parents[1] / "docs" / "results"


def test_a_record_round_trips_with_its_spec(tmp_path):
    ev = record("1101", {"pgd": "1001", "apgd-ce": "0101"}, spec={"n_eval": 4, "seed": 3})
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(ev.to_dict()))
    back = read_evaluation(path)
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION
    assert back.spec == {"n_eval": 4, "seed": 3} and back.robust_acc == {"pgd": 0.5, "apgd-ce": 0.5}
    assert back.worst_case().robust_mask.tolist() == [False, False, False, True]  # clean & pgd & apgd-ce


def test_merged_adds_the_rows_of_a_second_evaluation_of_the_same_samples():
    five = record("1101", {"pgd": "1001"})
    both = five.merged(record("1101", {"pgd:steps=20": "0001"}))
    assert list(both.attacks) == ["pgd", "pgd:steps=20"] and both.seconds == 2.0
    assert both.worst_case().robust_acc == 0.25
    with pytest.raises(ValueError, match="same model on the same samples"):
        five.merged(record("1111", {"pgd": "1001"}))


def test_the_pipelines_older_formats_are_read(tmp_path):
    """eval_strong.json wrapped a version-2 record as ``result`` beside its spec."""
    inner = record("1101", {"pgd": "1001"}).to_dict()
    inner.pop("spec")
    inner["schema_version"] = 2
    old = {"spec": {"attacks": ["pgd"], "n_eval": 4}, "n_eval": 4, "clean_acc": 0.75, "worst_case_acc": 0.5,
           "result": inner}
    ev = read_evaluation(old)
    assert ev.spec == old["spec"] and ev.worst_case().robust_acc == 0.5
    with pytest.raises(ValueError, match="not an evaluation record"):
        read_evaluation({"n": 4, "seed": 0})


def _committed() -> list[Path]:
    names = ("eval_strong.json", "suite.json", "eval.json", "eval_table.json")
    return sorted(p for p in DOCS.rglob("*.json") if p.name in names or p.parent.name == "autoattack-official")


@pytest.mark.parametrize("path", _committed(), ids=lambda p: str(p.relative_to(DOCS)))
def test_every_committed_evaluation_file_reads(path):
    ev = read_evaluation(path)
    assert 0 < ev.n_eval and 0 <= ev.clean_acc <= 1
    for row in ev.attacks.values():
        assert row.robust_acc <= ev.clean_acc + 1e-6
        if row.robust_mask is not None:
            assert len(row.robust_mask) == ev.n_eval and not (row.robust_mask & ~ev.clean_mask).any()


def test_committed_files_exist():
    assert len(_committed()) >= 5, "docs/results lost its evaluation records"


def test_autoattack_is_compared_image_by_image_with_our_worst_case():
    from abnn.reproduce.robust_substitute import autoattack_check

    ours = record("11110", {"pgd": "11010", "apgd-t": "10110"})  # worst case: images 0 and 3
    theirs = record("1111", {"autoattack-official": "1001"}, spec={"n": 4, "seed": 0, "batch_size": 4})
    check = autoattack_check(theirs, ours)
    assert check["autoattack_robust_indices"] == [0, 3] == check["ours_robust_indices"]
    assert check["agree_sample_by_sample"] and check["autoattack_acc"] == 0.5 == check["ours_acc"]
    check = autoattack_check(record("1111", {"autoattack-official": "1000"}), ours)
    assert not check["agree_sample_by_sample"] and check["key"] == {"seed": 0}


def test_an_autoattack_file_of_the_older_format_is_reused_without_attacking(tmp_path):
    from abnn.reproduce.robust_substitute import AUTOATTACK_FILE, job_autoattack

    ours = record("1" * 10, {"pgd": "1110000000"})
    old = {"key": {"n": 4, "seed": 0, "batch_size": 2}, "n": 4, "autoattack_acc": 0.25, "ours_acc": 0.75,
           "autoattack_robust_indices": [0], "ours_robust_indices": [0, 1, 2], "seconds": 9.0,
           "agree_sample_by_sample": False}
    (tmp_path / AUTOATTACK_FILE).write_text(json.dumps(old))
    assert job_autoattack(tmp_path, ours, 4, 2, None, "cpu", False) == old  # no model here: nothing ran
