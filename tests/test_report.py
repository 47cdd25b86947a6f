"""The results table: one row per dataset and anomaly score (and family), NaN shown as '-'."""

from __future__ import annotations

from gmmseg.evaluation.report import markdown_table, results_rows


def test_rows_cover_semantic_only_and_anomaly_splits():
    per_dataset = {
        "val": {"sem_seg": {"mIoU": 51.234, "ECE": 1.4}},
        "anomaly_val": {
            "sem_seg": {"mIoU": float("nan"), "ECE": 2.0},
            "anomaly": {
                "gmm/AUROC": 90.0,
                "gmm/AP": 40.0,
                "gmm/FPR95": 30.0,
                "gmm/near/AUROC": 80.0,
                "gmm/near/AP": 20.0,
                "gmm/near/FPR95": 50.0,
                "gmm/bound_AUROC": 0.01,  # not a column
                "gmm/sIoU": 25.0,
                "gmm/PPV": 60.0,
                "gmm/mean_F1": 12.5,
            },
        },
    }
    rows = results_rows("m", per_dataset)
    assert rows == [
        ("m", "val", "51.23", "1.40", "-", "-", "-", "-", "-", "-", "-"),
        ("m", "anomaly_val", "-", "2.00", "gmm", "90.00", "40.00", "30.00", "25.00", "60.00", "12.50"),
        ("m", "anomaly_val", "-", "2.00", "gmm (near)", "80.00", "20.00", "50.00", "-", "-", "-"),
    ]
    table = markdown_table(rows).splitlines()
    assert (
        table[0] == "| model | dataset | mIoU (%) | ECE (%) | anomaly score | AUROC (%) | AP (%) | FPR95 (%) "
        "| sIoU (%) | PPV (%) | mean F1 (%) |"
    )
    assert len(table) == 2 + len(rows)
