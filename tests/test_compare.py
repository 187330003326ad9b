"""``medspan compare`` (medspan.workflows.downstream): cells, skipping, tables, plot, MLflow, errors.

The comparison runs real MONAI bundles in-process through ``ConfigWorkflow``. Here the bundle is a
tiny one written by the test: its ``run`` writes the ``final_summary.json`` of the downstream
contract from its overrides, with ``key_value = base[encoder] + 0.25 * fraction + 0.125 * seed``
(dyadic numbers, so every mean and sd below is exact), and drops one file per call into
``<work_dir>/calls`` so the number of runs can be counted.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medspan.cli import main
from medspan.errors import DataError
from medspan.models.vit import build_vit
from medspan.workflows import downstream as ds

BASE = {"scratch": 0.125, "dino": 0.25, "span": 0.5}

_SUMMARY = {
    "task": "segmentation",
    "key_metric": "mean_dice",
    "eval_section": "test",
    "encoder_name": "@encoder_name",
    "pretrained": "@pretrained",
    "identity": {"datalist": "@datalist"},
    "hparams": "@hparams",
    "report": {},
}
_RUN = [
    "$medspan.io.write_text_atomic(@run_name, os.path.join(@work_dir, 'calls', @run_name + '.' + str(time.time_ns())))",
    "$medspan.io.write_json_atomic(@summary, os.path.join(@work_dir, @run_name, 'final_summary.json'))",
]
_COMMON = {
    "imports": ["$import os", "$import time", "$import medspan", "$import medspan.io"],
    "pretrained": None,
    "encoder_name": "scratch",
    "datalist": None,
    "dataset_dir": "data",
    "work_dir": "runs",
    "run_name": "run",
    "mlflow_tracking": True,
    "progress_bar": True,
    "resume": True,
    "base": BASE,
    "run": _RUN,
}
FAKE_TRAIN = {
    **_COMMON,
    "hparams": {"label_fraction": 1.0, "seed": 0, "epochs": 1},
    "key_value": "$@base[@encoder_name] + 0.25 * @hparams::label_fraction + 0.125 * @hparams::seed",
    "summary": {
        **_SUMMARY,
        "key_value": "@key_value",
        "key_ci": ["$@key_value - 0.0625", "$@key_value + 0.0625"],
        "label_fraction": "@hparams::label_fraction",
        "n_train": "$int(8 * @hparams::label_fraction)",
        "n_train_patients": "$int(8 * @hparams::label_fraction)",
        "seed": "@hparams::seed",
        "mode": "finetune",
    },
}
FAKE_ZERO = {
    **_COMMON,
    "hparams": {"epochs": 0},
    "summary": {
        **_SUMMARY,
        "key_value": "$@base[@encoder_name] - 0.25",
        "key_ci": None,
        "label_fraction": 0.0,
        "n_train": 0,
        "n_train_patients": 0,
        "seed": None,
        "mode": "zero_label",
    },
}


def _bundles(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "train.json").write_text(json.dumps(FAKE_TRAIN, indent=1))
    (folder / "zero_label.json").write_text(json.dumps(FAKE_ZERO, indent=1))
    return folder / "train.json", folder / "zero_label.json"


def _run_folder(path: Path, encoder: torch.nn.Module | None = None) -> str:
    """A pretraining run folder: model.pt (+ final_summary.json with the architecture when ``encoder``)."""
    path.mkdir(parents=True)
    if encoder is None:
        (path / "model.pt").write_bytes(b"weights")  # only digested by the fake bundle's cells
    else:
        torch.save(encoder.state_dict(), path / "model.pt")
        hp = {"model": "vit_toy", "in_chans": 1, "global_size": 32, "head_structures": {"0": "left_lung"}}
        (path / "final_summary.json").write_text(json.dumps({"hparams": hp, "baseline": False}))
    return str(path)


def _calls(out: Path) -> list[str]:
    return sorted(p.name.rsplit(".", 1)[0] for p in (out / "cells" / "calls").iterdir())


def _csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(text.splitlines()))


EXPECTED_MD = """# cxr_seg comparison: mean_dice

mean_dice on the test section, mean ± sd over seeds (sample sd, ddof=1; n = number of seeds; zero-label runs are deterministic, n=1).

| encoder | zero-label | 50% | 100% |
|---|---|---|---|
| scratch | — | 0.375 ± 0.125 (n=3) | 0.500 ± 0.125 (n=3) |
| dino | 0.000 (n=1) | 0.500 ± 0.125 (n=3) | 0.625 ± 0.125 (n=3) |
| span | 0.250 (n=1) | 0.750 ± 0.125 (n=3) | 0.875 ± 0.125 (n=3) |

## Encoder health

not computed (health check off, or the runs recorded no datalist: give --datalist)

## Summary

With zero labels, span is best (mean_dice 0.250, n=1): +0.250 over dino (0.000).
At 50% labels, span is best (mean_dice 0.750, n=3): +0.250 over dino (0.500); +0.375 over scratch (0.375).
At 100% labels, span is best (mean_dice 0.875, n=3): +0.250 over dino (0.625); +0.375 over scratch (0.500).
"""

# encoder, fraction, seed, n_train, value, ci_lo, ci_hi (by hand from the fake bundle's formula)
EXPECTED_CELLS = [
    ("dino_zero_label", "dino", "0.0", "", "0", "0.0", "", ""),
    ("span_zero_label", "span", "0.0", "", "0", "0.25", "", ""),
    ("scratch_f0.5_s0", "scratch", "0.5", "0", "4", "0.25", "0.1875", "0.3125"),
    ("scratch_f0.5_s1", "scratch", "0.5", "1", "4", "0.375", "0.3125", "0.4375"),
    ("scratch_f0.5_s2", "scratch", "0.5", "2", "4", "0.5", "0.4375", "0.5625"),
    ("scratch_f1_s0", "scratch", "1.0", "0", "8", "0.375", "0.3125", "0.4375"),
    ("scratch_f1_s1", "scratch", "1.0", "1", "8", "0.5", "0.4375", "0.5625"),
    ("scratch_f1_s2", "scratch", "1.0", "2", "8", "0.625", "0.5625", "0.6875"),
    ("dino_f0.5_s0", "dino", "0.5", "0", "4", "0.375", "0.3125", "0.4375"),
    ("dino_f0.5_s1", "dino", "0.5", "1", "4", "0.5", "0.4375", "0.5625"),
    ("dino_f0.5_s2", "dino", "0.5", "2", "4", "0.625", "0.5625", "0.6875"),
    ("dino_f1_s0", "dino", "1.0", "0", "8", "0.5", "0.4375", "0.5625"),
    ("dino_f1_s1", "dino", "1.0", "1", "8", "0.625", "0.5625", "0.6875"),
    ("dino_f1_s2", "dino", "1.0", "2", "8", "0.75", "0.6875", "0.8125"),
    ("span_f0.5_s0", "span", "0.5", "0", "4", "0.625", "0.5625", "0.6875"),
    ("span_f0.5_s1", "span", "0.5", "1", "4", "0.75", "0.6875", "0.8125"),
    ("span_f0.5_s2", "span", "0.5", "2", "4", "0.875", "0.8125", "0.9375"),
    ("span_f1_s0", "span", "1.0", "0", "8", "0.75", "0.6875", "0.8125"),
    ("span_f1_s1", "span", "1.0", "1", "8", "0.875", "0.8125", "0.9375"),
    ("span_f1_s2", "span", "1.0", "2", "8", "1.0", "0.9375", "1.0625"),
]


def test_compare_end_to_end_with_fake_bundle(tmp_path: Path) -> None:
    train, zero = _bundles(tmp_path)
    encoders = {"scratch": None, "dino": _run_folder(tmp_path / "dino"), "span": _run_folder(tmp_path / "span")}
    out = tmp_path / "out"
    kw = {"encoders": encoders, "fractions": [0.5, 1.0], "seeds": [0, 1, 2], "zero_label": True, "out": out,
          "bundle": train, "zero_label_bundle": zero, "health": False, "log": lambda m: None}

    report = ds.compare("seg", **kw)
    names = [c[0] for c in EXPECTED_CELLS]
    assert report.ran == names and report.skipped == []
    assert _calls(out) == sorted(names)  # each cell ran exactly once

    # results.csv: one row per cell, exact values
    rows = _csv_rows((out / "results.csv").read_text())
    assert list(rows[0]) == list(ds.CSV_COLUMNS)
    got = [(Path(r["run_dir"]).name, r["encoder"], r["fraction"], r["seed"], r["n_train"], r["value"], r["ci_lo"], r["ci_hi"])
           for r in rows]
    assert got == EXPECTED_CELLS
    assert {(r["task"], r["key_metric"], r["eval_section"], r["collapsed"]) for r in rows} == {("seg", "mean_dice", "test", "")}
    assert all(Path(r["run_dir"]) == out / "cells" / Path(r["run_dir"]).name for r in rows)
    # each cell's bundle got the overrides of the contract
    s = json.loads((out / "cells" / "span_f0.5_s1" / "final_summary.json").read_text())
    assert (s["encoder_name"], s["pretrained"], s["label_fraction"], s["seed"]) == ("span", str(Path(encoders["span"]).resolve()), 0.5, 1)
    assert s["hparams"] == {"label_fraction": 0.5, "seed": 1, "epochs": 1}

    # results.md: mean ± sd (ddof=1) by hand: e.g. span at 50% = mean(0.625, 0.75, 0.875) = 0.75, sd 0.125
    assert (out / "results.md").read_text() == EXPECTED_MD == report.markdown

    # results.png is a real PNG
    png = out / "results.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.verify()

    # results.json: machine-readable copy
    doc = json.loads((out / "results.json").read_text())
    assert doc["stats"]["span"]["0.5"] == {"mean": 0.75, "sd": 0.125, "n": 3}
    assert doc["stats"]["dino"]["0"] == {"mean": 0.0, "sd": None, "n": 1}
    assert len(doc["cells"]) == 20 and doc["summary"] == EXPECTED_MD.strip().splitlines()[-3:]

    # MLflow: one parent with exactly one child per cell, params and metrics of the cells
    from mlflow.tracking import MlflowClient

    client = MlflowClient(ds.sqlite_uri(out / "mlruns.db"))
    exp = client.get_experiment_by_name("cxr_seg_compare")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{report.parent_run_id}'", max_results=100)
    assert len(children) == 20
    by_name = {c.info.run_name: c for c in children}
    assert set(by_name) == set(names)
    c = by_name["span_f0.5_s1"]
    assert c.data.params["encoder"] == "span" and c.data.params["fraction"] == "0.5" and c.data.params["seed"] == "1"
    assert c.data.params["mode"] == "finetune"
    assert c.data.metrics == {"mean_dice": 0.75, "mean_dice_ci_lo": 0.6875, "mean_dice_ci_hi": 0.8125}
    assert by_name["dino_zero_label"].data.metrics == {"mean_dice": 0.0}
    parent = client.get_run(report.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["span_f0.5_mean"] == 0.75
    assert all(ch.info.status == "FINISHED" for ch in children)

    # re-run: every cell is reused, nothing runs again, same tables
    again = ds.compare("seg", **{**kw, "mlflow": False})
    assert again.ran == [] and again.skipped == names
    assert _calls(out) == sorted(names)
    assert (out / "results.md").read_text() == EXPECTED_MD

    # a cell without its fingerprint (killed before it finished) runs again, alone
    (out / "cells" / "span_f1_s2" / ds.CELL_FINGERPRINT).unlink()
    third = ds.compare("seg", **{**kw, "mlflow": False})
    assert third.ran == ["span_f1_s2"] and len(third.skipped) == 19
    assert _calls(out) == sorted(names + ["span_f1_s2"])

    # another override is another fingerprint: every cell it touches runs again
    fourth = ds.compare("seg", **{**kw, "mlflow": False, "zero_label": False, "extra": {"hparams::epochs": 2}})
    assert fourth.skipped == [] and len(fourth.ran) == 18
    assert json.loads((out / "cells" / "span_f1_s2" / "final_summary.json").read_text())["hparams"]["epochs"] == 2


def test_cell_with_other_settings_is_not_reused(tmp_path: Path) -> None:
    train, _ = _bundles(tmp_path)
    out = tmp_path / "out"
    kw = {"encoders": {"scratch": None}, "fractions": [1.0], "seeds": [0], "out": out, "bundle": train,
          "health": False, "mlflow": False, "log": lambda m: None}
    assert ds.compare("seg", **kw).ran == ["scratch_f1_s0"]
    doc = json.loads(train.read_text())
    doc["base"]["scratch"] = 0.0  # the bundle file changed: its digest is in the fingerprint
    train.write_text(json.dumps(doc))
    rep = ds.compare("seg", **kw)
    assert rep.ran == ["scratch_f1_s0"] and rep.rows[0]["value"] == 0.25
    assert _calls(out) == ["scratch_f1_s0", "scratch_f1_s0"]


def test_summary_that_ignores_the_overrides_fails(tmp_path: Path) -> None:
    train, _ = _bundles(tmp_path)
    doc = json.loads(train.read_text())
    doc["summary"]["seed"] = 7  # a bundle that does not honour hparams::seed
    train.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"final_summary.json: the run records seed 7 \(asked 0\)"):
        ds.compare("seg", encoders={"scratch": None}, fractions=[1.0], seeds=[0], out=tmp_path / "out",
                   bundle=train, health=False, mlflow=False, log=lambda m: None)


def test_missing_default_encoder_says_run_the_main_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)  # no bundles/span_cxr/runs here
    monkeypatch.delenv("MEDSPAN_DEBUG", raising=False)
    assert main(["compare", "--task", "seg", "--no-mlflow"]) == 1
    err = capsys.readouterr().err.splitlines()[0]
    assert err == (
        "[medspan] error: DataError: bundles/span_cxr/runs/span_cxr_baseline: no pretraining run for the default "
        "encoder 'dino'; run the span_cxr main job first (python -m monai.bundle run --config_file "
        "bundles/span_cxr/train.json), or give --encoders NAME=PATH,..."
    )
    with pytest.raises(DataError, match="span_cxr_baseline: encoder 'dino': the folder has no model.pt"):
        (tmp_path / "bundles/span_cxr/runs/span_cxr_baseline").mkdir(parents=True)
        ds.check_encoders(ds.DEFAULT_ENCODERS, defaults=True)
    with pytest.raises(DataError, match="elsewhere: encoder 'x': not found"):
        ds.check_encoders({"x": "elsewhere"})


def test_argument_parsers() -> None:
    assert ds.parse_encoders("scratch=none, dino=a/b ,span=c") == {"scratch": None, "dino": "a/b", "span": "c"}
    assert ds.parse_fractions("1,0.1,0.01,0.1") == [0.01, 0.1, 1.0]
    assert ds.parse_seeds("2,0,2,1") == [2, 0, 1]
    assert ds.parse_set(["hparams::epochs=5", "x=abc", "y=[1, 2]", "z=null"]) == {
        "hparams::epochs": 5, "x": "abc", "y": [1, 2], "z": None}
    for bad, fn in [("a", ds.parse_encoders), ("a=1,a=2", ds.parse_encoders), ("../x=1", ds.parse_encoders),
                    ("0", ds.parse_fractions), ("1.5", ds.parse_fractions), ("x", ds.parse_seeds)]:
        with pytest.raises(DataError):
            fn(bad)
    with pytest.raises(DataError, match="'hparams::seed' is set by the comparison"):
        ds.cell_overrides(ds.Cell("a", None, 0.1, 0), work_dir="w", extra={"hparams::seed": 3})
    with pytest.raises(DataError, match="--zero-label: zero-label mode exists for segmentation only"):
        ds.compare("cls", encoders={"scratch": None}, zero_label=True)
    with pytest.raises(DataError, match="--mode: linear/finetune is a classification setting"):
        ds.compare("seg", encoders={"scratch": None}, mode="linear")


def test_aggregate_and_sentences_by_hand() -> None:
    rows = [{"encoder": e, "fraction": 0.01, "value": v} for e, v in
            [("a", 0.70), ("a", 0.74), ("a", 0.72), ("b", 0.72), ("b", 0.70), ("b", 0.71)]]
    stats = ds.aggregate(rows)
    assert stats["a"][0.01]["mean"] == pytest.approx(0.72) and stats["a"][0.01]["sd"] == pytest.approx(0.02)
    assert stats["b"][0.01]["sd"] == pytest.approx(0.01) and stats["b"][0.01]["n"] == 3
    # margin 0.01 is less than a's sd (0.02): said so; a collapsed encoder is named
    assert ds.best_sentences(stats, "mean_auc", {"b": True}) == [
        ("At 1% labels, a is best (mean_auc 0.720, n=3): +0.010 over b (0.710, within the spread of the seeds, "
        "flagged collapsed).")
    ]


def _write_datalist(tmp_path: Path, n: int = 12) -> Path:
    """Validation images whose label is where the bright block is (left: class a, right: class b)."""
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n):
        img = (rng.random((40, 40)) * 60).astype(np.uint8)
        left = i % 2 == 0
        img[8:32, (2 if left else 22):(18 if left else 38)] = 255
        Image.fromarray(img).save(tmp_path / f"img{i}.png")
        entries.append({"image": f"img{i}.png", "labels": [int(left), int(not left)], "patient_id": f"p{i}"})
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"classes": ["a", "b"], "training": entries[:2], "validation": entries}))
    return path


def test_encoder_health_flags_a_collapsed_encoder(tmp_path: Path) -> None:
    datalist = _write_datalist(tmp_path)
    torch.manual_seed(1)
    alive = _run_folder(tmp_path / "alive", build_vit("vit_toy", in_chans=1, img_size=32))
    dead = build_vit("vit_toy", in_chans=1, img_size=32)
    with torch.no_grad():
        for p in dead.parameters():
            p.zero_()  # every image gives the same features: collapsed
    dead_dir = _run_folder(tmp_path / "dead", dead)
    encoders = {"scratch": None, "alive": alive, "dead": dead_dir}

    state = torch.random.get_rng_state()
    health = ds.encoder_health_rows(encoders, datalist)
    assert torch.equal(state, torch.random.get_rng_state())  # the scratch reference leaves the caller's RNG alone
    assert list(health) == ["scratch", "alive", "dead"]
    assert all((h["n_images"], h["section"], h["n"], h["dim"]) == (14, "training+validation", 14, 96) for h in health.values())
    assert health["dead"]["collapsed"] is True and health["dead"]["effective_rank"] == 0.0
    assert "features are constant (no spread across cases)" in health["dead"]["reasons"]
    assert health["alive"]["effective_rank"] > 1.0 and health["alive"]["knn_accuracy"] is not None
    assert health == ds.encoder_health_rows(encoders, datalist)  # deterministic, scratch included
    # a segmentation datalist without ``labels``: no k-NN figure, the other checks still run
    doc = json.loads(datalist.read_text())
    for e in doc["validation"]:
        del e["labels"]
    (tmp_path / "seg.json").write_text(json.dumps(doc))
    seg = ds.encoder_health_rows({"alive": alive}, tmp_path / "seg.json")["alive"]
    assert seg["knn_accuracy"] is None and seg["effective_rank"] == health["alive"]["effective_rank"]

    # through compare(): the collapsed column, the warning line in results.md
    train, _ = _bundles(tmp_path)
    cells = {"scratch": None, "dead": dead_dir}
    doc = json.loads(train.read_text())
    doc["base"]["dead"] = 0.75
    train.write_text(json.dumps(doc))
    lines: list[str] = []
    rep = ds.compare("cls", encoders=cells, fractions=[1.0], seeds=[0], datalist=datalist, out=tmp_path / "out",
                     bundle=train, mlflow=False, log=lines.append)
    rows = _csv_rows((tmp_path / "out" / "results.csv").read_text())
    assert [(r["encoder"], r["collapsed"]) for r in rows] == [("scratch", ""), ("dead", "true")]
    md = rep.markdown
    assert "| dead ⚠ collapsed | 1.000 (n=1) |" in md
    assert "WARNING: encoder 'dead' looks collapsed (features are constant (no spread across cases)" in md
    assert "WARNING: encoder 'scratch'" not in md and "| scratch (reference) |" in md
    assert "At 100% labels, dead is best (mean_dice 1.000, n=1 — flagged collapsed): +0.625 over scratch (0.375)." in md
    assert any(m.startswith("WARNING: encoder 'dead' looks collapsed") for m in lines)


def test_undefined_values_are_left_out_and_said() -> None:
    """A cell whose key metric is undefined (None, e.g. no class with positives) counts in no mean."""
    def row(enc: str, seed: int, value: float | None) -> dict:
        return {"task": "cls", "encoder": enc, "fraction": 1.0, "seed": seed, "n_train": 4, "key_metric": "mean_auc",
                "value": value, "ci_lo": None, "ci_hi": None, "eval_section": "test", "run_dir": f"c/{enc}{seed}",
                "collapsed": None}

    rows = [row("a", 0, 0.5), row("a", 1, None), row("b", 0, None)]
    stats = ds.aggregate(rows)
    assert stats == {"a": {1.0: {"mean": 0.5, "sd": None, "n": 1}}, "b": {1.0: {"mean": None, "sd": None, "n": 0}}}
    md = ds.format_results_md(task="cls", mode=None, rows=rows, health={}, encoders={"a": None, "b": None})
    assert "| a | 0.500 (n=1) |" in md and "| b | undefined |" in md
    assert md.endswith("At 100% labels, a is best (mean_auc 0.500, n=1) (the only encoder).\n")
    assert ds.results_csv(rows).splitlines()[2] == "cls,a,1.0,1,4,mean_auc,,,,test,c/a1,"


def test_zero_label_cells_only_for_encoders_with_guided_heads(tmp_path: Path) -> None:
    """A plain-DINO baseline run (recorded ``baseline: true``) gets no zero-label cell; a SPAN run does."""
    span = _run_folder(tmp_path / "span", build_vit("vit_toy", in_chans=1, img_size=32))
    dino = Path(_run_folder(tmp_path / "dino", build_vit("vit_toy", in_chans=1, img_size=32)))
    rec = json.loads((dino / "final_summary.json").read_text())
    (dino / "final_summary.json").write_text(json.dumps({**rec, "baseline": True}))
    assert ds.has_guided_heads(span) and not ds.has_guided_heads(str(dino)) and not ds.has_guided_heads(None)
    cells = ds.plan_cells({"scratch": None, "dino": str(dino), "span": span}, [1.0], [0], zero_label=True,
                          guided=ds.has_guided_heads)
    assert [c.run_name for c in cells] == ["span_zero_label", "scratch_f1_s0", "dino_f1_s0", "span_f1_s0"]
