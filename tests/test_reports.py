"""reports.py: report.md and its figures from a run's results files (written here by a fake generator)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import pytest

from neuroimagen.errors import DataError

ALL_VARIANTS = ("L+I", "other-class", "I", "B", "oracle", "L", "B+I")  # deliberately not in paper order
BASE_ACC = {"I": 0.40, "L": 0.60, "B": 0.55, "B+I": 0.65, "L+I": 0.85, "oracle": 0.95, "other-class": 0.03}
IS = {"I": float("nan"), "L": 3.21, "B": 2.5, "B+I": 2.2, "L+I": 3.0, "oracle": 4.0, "other-class": 1.5}
SSIM = {"I": 0.300, "L": 0.100, "B": 0.110, "B+I": 0.310, "L+I": 0.320, "oracle": 0.500, "other-class": 0.050}
SALIENCY = {"I": True, "L": False, "B": False, "B+I": True, "L+I": True, "oracle": False, "other-class": True}
SEMANTICS = {"I": "none", "L": "label", "B": "image", "B+I": "image", "L+I": "label", "oracle": "true",
             "other-class": "label"}
CLASSES = ["airliner", "panda", "jack-o'-lantern", "canoe", "pizza"]
ITEMS = {"1": [12, 3, 7], "2": [20, 15, 4]}
SUBJECT_SHIFT = {"1": -0.05, "2": 0.05}
WARNING = "n-way accuracy: n=50 exceeds the classifier's 5 classes; clamping to n=5"


def _png(path: Path, colour, size=(16, 16)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, tuple(int(c) for c in colour)).save(path)


def make_run(root: Path, subjects=("1", "2"), variants=ALL_VARIANTS, samples=2, pooled=True,
             judge_kind="judge") -> Path:
    """A fake run directory with results/{per_sample.parquet, summary.csv, protocol.json} and small PNGs."""
    import numpy as np
    import pandas as pd

    run = root / "run"
    gt_dir = root / "data" / "images"
    rows = []
    for s in subjects:
        for item in ITEMS[s]:
            label = item % len(CLASSES)
            stem = f"n{label:08d}_{item}"
            gt = gt_dir / f"{stem}.png"
            _png(gt, (40 * label, 200, 90), size=(20, 16))
            for v in variants:
                sal = f"saliency/{v}/{s}_{item}.png" if SALIENCY[v] else ""
                if sal:
                    _png(run / sal, (120, 120, 40 * label))
                for k in range(samples):
                    img = f"images/{v}/{s}_{item}_{k}.png"
                    _png(run / img, (30 * k, 40 * label, 100))
                    probs = np.full(len(CLASSES), 0.1)
                    probs[label] = 0.6
                    rows.append(dict(subject=s, variant=v, item=item, stem=stem, label=label,
                                     class_name=CLASSES[label], sample=k, seed=1000 + k, judge_gt_top1=label,
                                     judge_top1=label, acc_hit=BASE_ACC[v], acc_n=5, ssim=SSIM[v],
                                     probs=probs.tolist(), image=img, saliency=sal, gt=str(gt.resolve())))
    (run / "results").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(run / "results" / "per_sample.parquet")

    summary = []
    for v in variants:
        groups = [(s, SUBJECT_SHIFT[s] if len(subjects) > 1 else 0.0) for s in subjects]
        if pooled:
            groups.append(("all", 0.0))
        for s, shift in groups:
            n_eeg = len(ITEMS[s]) if s != "all" else sum(len(ITEMS[x]) for x in subjects)
            summary.append(dict(subject=s, variant=v, n=n_eeg * samples, n_eeg=n_eeg, acc=BASE_ACC[v] + shift,
                                acc_max=min(1.0, BASE_ACC[v] + 0.1 + shift), acc_chance=0.2, acc_n=5,
                                **{"is": IS[v]}, is_std=0.1, is_splits=2, ssim=SSIM[v], ssim_std=0.02,
                                judge_gt_acc={"1": 0.9, "2": 0.8, "all": 0.85}[s]))
    pd.DataFrame(summary).to_csv(run / "results" / "summary.csv", index=False)

    protocol = {
        "data": {"dataset": "eeg-imagenet (synthetic twin)", "split": "test", "n_subjects": len(subjects)},
        "classifier": {"identity": "judge-tiny-cnn@abc123", "kind": judge_kind, "num_classes": 5, "input_size": 32,
                       "gt_accuracy": 0.85},
        "acc": {"n": 50, "k": 1, "trials": 37, "seed": 7, "n_eff": 5, "warning": WARNING},
        "is": {"networks": {"is": {"label": "IS (judge CNN, not Inception-v3)" if judge_kind == "judge" else
                                   "IS (vit_h_14 ACC classifier, not Inception-v3)",
                                   "network": "the judge CNN judge-tiny-cnn@abc123 trained on the training images; "
                                              "not Inception-v3" if judge_kind == "judge" else "vit"}},
               "max_splits": 10, "split_rule": "splits = clamp(N // 50, 1, 10) for a group of N images", "seed": 0,
               "classifier_note": "probabilities of the in-domain judge"},
        "ssim": {"convention": "dreamdiffusion (colour, data_range=255)", "resolution": 64},
        "ldm": {"kind": "tiny", "identity": "tiny-ldm@def456", "strength": 0.75, "guidance_scale": 7.5,
                "num_inference_steps": 20, "samples_per_eeg": samples, "resolution": 64},
        "variants": {v: {"saliency": SALIENCY[v], "semantics": SEMANTICS[v],
                         "eeg": "other_class" if v == "other-class" else "own",
                         "init": "gt" if v == "oracle" else ("saliency" if SALIENCY[v] else "noise"),
                         "description": f"desc of {v}"} for v in variants},
    }
    (run / "results" / "protocol.json").write_text(json.dumps(protocol))
    return run


def section(text: str, heading: str) -> str:
    """The body of the '## heading' section of a markdown text."""
    start = text.index(f"## {heading}")
    end = text.find("\n## ", start + 3)
    return text[start:] if end < 0 else text[start:end]


def table_rows(text: str) -> list[list[str]]:
    """Data rows (cells stripped) of the first markdown table in ``text``."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines[2:]]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    from neuroimagen.runs.reports import write_report

    run = make_run(tmp_path_factory.mktemp("full"))
    path = write_report(run, extra_sections=["## Notes\n\nhand-written | verbatim *text*"], grid_items=4)
    return run, path, path.read_text()


def test_report_is_written_under_run_report(full):
    run, path, text = full
    assert path == run / "report" / "report.md"
    assert text.startswith("# NeuroImagen reconstruction report")
    for heading in ("Ablation (Table 3 analogue)", "Per subject (Table 2 analogue)", "Judge", "Samples", "Protocol"):
        assert f"\n## {heading}" in text
    assert not list((run / "report").glob("*.partial-*"))


def test_ablation_rows_in_paper_order_with_numbers(full):
    _, _, text = full
    rows = table_rows(section(text, "Ablation"))
    assert [r[0].split(":")[0] for r in rows] == ["1 (I)", "2 (L)", "3 (B)", "4 (B+I)", "5 (L+I)", "oracle", "other-class"]
    by = {r[0].split(":")[0]: r for r in rows}
    assert by["5 (L+I)"][0] == "5 (L+I): desc of L+I"  # description from protocol.json
    # ACC: mean ± sample std over the two subjects (0.80, 0.90) -> 85.0 ± 7.1
    assert by["2 (L)"][1] == "60.0 ± 7.1"
    assert by["other-class"][1] == "3.0 ± 7.1"
    assert by["3 (B)"][2] == "65.0"  # ACC max-of-samples, pooled row
    assert by["3 (B)"][3] == "20.0"  # chance k/N
    assert by["3 (B)"][4] == "2.50" and by["3 (B)"][5] == "0.110"
    assert by["oracle"][6] == "12"  # images


def test_ablation_bolds_best_paper_variant_per_column(full):
    _, _, text = full
    by = {r[0].split(":")[0]: r for r in table_rows(section(text, "Ablation"))}
    assert by["5 (L+I)"][1] == "**85.0 ± 7.1**"  # ACC
    assert by["5 (L+I)"][2] == "**95.0**"  # ACC max
    assert by["2 (L)"][4] == "**3.21**"  # IS
    assert by["5 (L+I)"][5] == "**0.320**"  # SSIM
    # controls are never bold even when higher; the chance column is never bold
    assert by["oracle"][1] == "95.0 ± 7.1" and by["oracle"][4] == "4.00"
    assert sum(c.count("**") for r in by.values() for c in r) == 2 * 4


def test_nan_is_prints_na(full):
    _, _, text = full
    by = {r[0].split(":")[0]: r for r in table_rows(section(text, "Ablation"))}
    assert by["1 (I)"][4] == "n/a"
    assert "nan" not in section(text, "Ablation").lower().replace("n/a", "")


def test_per_subject_section_uses_main_variant(full):
    _, _, text = full
    sec = section(text, "Per subject")
    assert "Variant 5 (L+I)." in sec
    rows = table_rows(sec)
    assert [r[0] for r in rows] == ["subj 1", "subj 2", "all (pooled)"]
    assert rows[0][1:] == ["80.0", "90.0", "3.00", "0.320", "6"]
    assert rows[1][1] == "90.0" and rows[2][1] == "85.0"
    assert "](per_subject.png)" in sec


def test_judge_section(full):
    _, _, text = full
    sec = section(text, "Judge")
    assert "judge-tiny-cnn@abc123" in sec and "kind judge" in sec
    assert "only means something when the judge classifies the ground-truth images well" in sec
    rows = table_rows(sec)
    assert rows == [["subj 1", "90.0"], ["subj 2", "80.0"], ["all (pooled)", "85.0"]]
    assert "Caution" not in sec


def test_protocol_section_values(full):
    _, _, text = full
    sec = section(text, "Protocol")
    assert "eeg-imagenet (synthetic twin)" in sec and "split: test" in sec
    assert "N = 50 requested, N = 5 effective; k = 1" in sec
    assert "trials per image: 37; seed: 7" in sec
    assert WARNING in sec
    assert ("IS (judge CNN, not Inception-v3) (summary.csv `is`): the judge CNN judge-tiny-cnn@abc123 trained on "
            "the training images; not Inception-v3") in sec
    assert "splits = clamp(N // 50, 1, 10) for a group of N images, after a seeded shuffle (seed 0)" in sec
    assert "convention: dreamdiffusion (colour, data_range=255)" in sec and "resolution: 64 px" in sec
    assert "strength: 0.75" in sec and "inference steps: 20" in sec
    assert "input size: 32 px" in sec and "classes: 5" in sec
    vrows = {r[0]: r for r in table_rows(sec[sec.index("**Variants**"):])}
    assert list(vrows) == ["I", "L", "B", "B+I", "L+I", "oracle", "other-class"]
    assert vrows["other-class"][1:6] == ["–", "True", "label", "other_class", "saliency"]
    # the header repeats the protocol in one line and the clamp warning
    head = text[:text.index("\n## ")]
    assert "5-way top-1 over 37 trials (seed 7)" in head and WARNING in head


def test_extra_sections_appended_verbatim(full):
    _, _, text = full
    assert text.rstrip().endswith("## Notes\n\nhand-written | verbatim *text*")
    assert text.index("## Protocol") < text.index("## Notes")


def test_figures_are_valid_pngs(full):
    from PIL import Image

    run, _, text = full
    report = run / "report"
    names = ["per_subject.png", "comparison.png"] + [f"grid_{v}.png" for v in ALL_VARIANTS]
    for name in names:
        assert f"]({name})" in text, name
        with Image.open(report / name) as im:
            assert im.format == "PNG"
            assert im.width >= 300 and im.height >= 200, (name, im.size)
            im.verify()
    # grids: 4 rows, GT | saliency | 2 samples -> wider than tall; comparison: GT + 7 variants
    with Image.open(report / "grid_L+I.png") as g, Image.open(report / "comparison.png") as c:
        assert c.width > g.width and abs(c.height - g.height) <= 2
    assert "could not be read" not in section(text, "Samples")


def test_summary_table_is_the_ablation_table(full):
    from neuroimagen.runs.reports import summary_table

    run, _, text = full
    table = summary_table(run)
    assert table.startswith("| variant | ACC (%)")
    assert table in section(text, "Ablation")


def test_pick_trials_first_distinct_sorted_by_subject_then_item():
    import pandas as pd

    from neuroimagen.runs.reports import pick_trials

    df = pd.DataFrame({"subject": ["10", "2", "2", "2", "1", "10"], "item": [1, 9, 5, 5, 30, 0]})
    assert pick_trials(df, 3) == [("1", 30), ("2", 5), ("2", 9)]
    assert pick_trials(df, 10) == [("1", 30), ("2", 5), ("2", 9), ("10", 0), ("10", 1)]


def test_subset_of_variants_single_subject(tmp_path):
    from neuroimagen.runs.reports import write_report

    run = make_run(tmp_path, subjects=("1",), variants=("other-class", "L+I"), samples=3)
    text = write_report(run, title="Subset run", grid_items=2).read_text()
    assert text.startswith("# Subset run")
    rows = table_rows(section(text, "Ablation"))
    assert [r[0].split(":")[0] for r in rows] == ["5 (L+I)", "other-class"]
    assert rows[0][1] == "85.0" and "**" not in section(text, "Ablation")  # one subject: no ±, nothing to bold
    assert [r[0] for r in table_rows(section(text, "Per subject"))] == ["subj 1"]
    report = run / "report"
    assert sorted(p.name for p in report.glob("*.png")) == ["comparison.png", "grid_L+I.png", "grid_other-class.png",
                                                            "per_subject.png"]


def test_main_variant_falls_back_to_last_paper_variant():
    from neuroimagen.runs.reports import main_variant

    assert main_variant(["other-class", "B", "I", "oracle"]) == "B"
    assert main_variant(["B+I", "L+I", "L"]) == "L+I"
    assert main_variant(["oracle", "other-class"]) == "oracle"


def test_without_pooled_rows_and_torchvision_judge(tmp_path):
    from neuroimagen.runs.reports import write_report

    run = make_run(tmp_path, variants=("I", "B+I"), pooled=False, judge_kind="torchvision")
    text = write_report(run).read_text()
    by = {r[0].split(":")[0]: r for r in table_rows(section(text, "Ablation"))}
    assert by["4 (B+I)"][1] == "**65.0 ± 7.1**"
    assert by["4 (B+I)"][4] == "n/a"  # IS is a whole-set statistic: not rebuilt from subjects
    assert by["4 (B+I)"][5] == "**0.310**"
    assert "Variant 4 (B+I)." in section(text, "Per subject")
    assert "| IS (vit_h_14 ACC classifier, not Inception-v3) |" in section(text, "Ablation")  # a ViT's IS is no IS


def test_missing_image_files_are_drawn_and_counted(tmp_path):
    from neuroimagen.runs.reports import write_report

    run = make_run(tmp_path, subjects=("1",), variants=("L+I",))
    gt = next((tmp_path / "data" / "images").glob("*.png"))
    gt.unlink()
    text = write_report(run, grid_items=3).read_text()
    assert "could not be read" in text and gt.name in text


@pytest.mark.parametrize("name", ["summary.csv", "per_sample.parquet", "protocol.json"])
def test_missing_results_file_is_one_line_data_error(tmp_path, name):
    from neuroimagen.runs.reports import summary_table, write_report

    run = make_run(tmp_path, subjects=("1",), variants=("L+I",), samples=1)
    path = run / "results" / name
    path.unlink()
    with pytest.raises(DataError) as err:
        write_report(run)
    msg = str(err.value)
    assert str(path) in msg and "not found" in msg and "neuroimagen evaluate --run" in msg
    assert "\n" not in msg
    assert not (run / "report" / "report.md").exists()
    if name == "summary.csv":
        with pytest.raises(DataError, match="summary.csv: not found"):
            summary_table(run)
    else:
        assert summary_table(run).startswith("| variant")
        if name == "protocol.json":  # nothing says which network produced the IS: the header says so
            assert "| IS (network not recorded) |" in summary_table(run)


def test_unreadable_results_are_data_errors(tmp_path):
    from neuroimagen.runs.reports import write_report

    run = make_run(tmp_path, subjects=("1",), variants=("L+I",), samples=1)
    (run / "results" / "per_sample.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="per_sample.parquet: unreadable"):
        write_report(run)
    run = make_run(tmp_path / "b", subjects=("1",), variants=("L+I",), samples=1)
    (run / "results" / "summary.csv").write_text("subject,variant\n1,L+I\n")
    with pytest.raises(DataError, match=r"summary.csv: missing column\(s\) \['acc'\]"):
        write_report(run)


def test_format_helpers():
    from neuroimagen.runs.reports import fmt_num, format_table

    assert fmt_num(float("nan")) == "n/a" and fmt_num(None) == "n/a" and fmt_num(math.inf) == "n/a"
    assert fmt_num(0.8567, ".1f", 100) == "85.7"
    table = format_table(["a", "b"], [["x|y", 1.5]])
    assert table.splitlines() == ["| a | b |", "|:---|---:|", "| x\\|y | 1.5 |"]
    with pytest.raises(ValueError):
        format_table(["a", "b"], [["only one"]])


# --------------------------------------------------------------------------------------------------
# evaluate -> summary.csv / protocol.json -> report: the classifier's label space and the IS networks


IMAGENET_INDEX = [409, 2, 817, 980, 130]  # the ImageNet-1k index of each dataset label (CLASSES order)


def scored_run(root: Path, classifier: dict, is_network: Optional[dict] = None, misread: int = 0) -> Path:
    """A run directory as ``reconstruct`` leaves it (results/state.json and finished shards) for ``evaluate``:
    one subject, 10 trials x 3 samples of 5 classes, scored by an ImageNet-1k classifier (its top-1 on the GT
    image is the class's ImageNet index; ``misread`` trials get another index)."""
    import numpy as np
    import pandas as pd

    from neuroimagen.runs.evaluation import STATE, _shard_name

    run = root / "run"
    fp = "f" * 12
    rng = np.random.default_rng(0)
    rows = []
    for item in range(10):
        label = item % len(CLASSES)
        for k in range(3):
            probs = rng.dirichlet(np.full(1000, 0.05))
            rows.append(dict(subject="1", variant="L+I", item=item, eeg_item=item, stem=f"n0000000{label}_{item}",
                             label=label, class_name=CLASSES[label], sample=k, seed=k, gt=str(root / "gt.png"),
                             judge_gt_top1=IMAGENET_INDEX[label] if item >= misread else 0,
                             judge_top1=int(probs.argmax()), acc_hit=0.5, acc_n=50, ssim=0.3, probs=probs.tolist(),
                             image=f"results/images/{item}-{k}.png", saliency="",
                             **({"is_probs": rng.dirichlet(np.full(1000, 0.05)).tolist()} if is_network else {})))
    shard = run / "results" / "shards" / fp / _shard_name("1", "L+I")
    shard.parent.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(shard, index=False)
    state = {"fingerprint": fp, "variants": ["L+I"], "subjects": ["1"], "shards": {shard.name: len(rows)},
             "ldm": {"kind": "pretrained", "identity": "/models/sd15", "strength": 0.75, "guidance_scale": 7.5,
                     "num_inference_steps": 50, "samples_per_eeg": 3},
             "classifier": classifier, "is_network": is_network or {},
             "eval": {"top_k": 1, "n_way": 50, "trials": 50, "is_splits": 10, "ssim_convention": "dreamdiffusion",
                      "ssim_resolution": None},
             "seed": 0, "data": {"format": "eeg-imagenet", "eeg": "/data/eeg_5_95_std.pth", "split": "test",
                                 "split_file": "/data/block_splits_by_image_all.pth", "split_num": 0},
             "variant_definitions": {"L+I": {"description": "full"}}, "resolution": 64}
    (run / STATE).write_text(json.dumps(state))
    return run


TV = {"kind": "torchvision", "identity": "torchvision:vit_h_14@/models/vit.pth", "arch": "vit_h_14",
      "spec": {"kind": "torchvision"}}


def test_gt_accuracy_of_an_imagenet_classifier_without_a_class_file_is_not_available(tmp_path):
    """Its top-1 is an ImageNet index (0..999), the dataset label is 0..4: comparing them read 0 % and raised a
    false caution; without a mapping the number is reported as not available, with the reason."""
    import pandas as pd

    from neuroimagen.runs.evaluation import evaluate
    from neuroimagen.runs.reports import write_report

    reason = "not available: eval.classifier_classes is not set (test)"
    run = scored_run(tmp_path, {**TV, "label_to_class": None, "gt_accuracy_unavailable": reason})
    evaluate(run, log=lambda m: None)
    protocol = json.loads((run / "results" / "protocol.json").read_text())
    assert protocol["classifier"]["gt_accuracy"] is None
    assert protocol["classifier"]["gt_accuracy_unavailable"] == reason
    assert pd.read_csv(run / "results" / "summary.csv")["judge_gt_acc"].isna().all()
    judge = section(write_report(run).read_text(), "Judge")
    assert f"top-1 accuracy on the ground-truth test images: n/a ({reason})" in judge
    assert "Caution" not in judge and "0.0 %" not in judge


def test_gt_accuracy_of_an_imagenet_classifier_goes_through_the_wnid_mapping(tmp_path):
    import pandas as pd

    from neuroimagen.runs.evaluation import evaluate
    from neuroimagen.runs.reports import write_report

    run = scored_run(tmp_path, {**TV, "label_to_class": IMAGENET_INDEX, "label_space": "dataset WNIDs in c.json"},
                     misread=2)
    evaluate(run, log=lambda m: None)
    protocol = json.loads((run / "results" / "protocol.json").read_text())
    assert protocol["classifier"]["gt_accuracy"] == pytest.approx(0.8)  # 8 of 10 trials
    assert "dataset WNIDs in c.json" in protocol["classifier"]["gt_accuracy_protocol"]
    summary = pd.read_csv(run / "results" / "summary.csv", dtype={"subject": str}).set_index("subject")
    assert summary.loc["1", "judge_gt_acc"] == pytest.approx(0.8)
    judge = section(write_report(run).read_text(), "Judge")
    assert "top-1 accuracy on the ground-truth test images: 80.0 %" in judge and "Caution" not in judge


def test_every_is_names_its_network_and_records_n_and_splits(tmp_path):
    import pandas as pd

    from neuroimagen.runs.evaluation import evaluate
    from neuroimagen.runs.reports import write_report

    sha = "ab" * 32
    is_net = {"identity": f"inception_v3@/models/inc.pth#sha256:{sha[:12]}", "weights_sha256": sha,
              "torchvision_file": False, "input_size": 299, "preprocessing": "resize 342 bilinear, centre crop 299",
              "spec": {"kind": "inception"}}
    run = scored_run(tmp_path, {**TV, "label_to_class": IMAGENET_INDEX}, is_network=is_net)
    evaluate(run, log=lambda m: None)
    summary = pd.read_csv(run / "results" / "summary.csv", dtype={"subject": str}).set_index("subject")
    assert summary.loc["1", "is_n"] == 30 and summary.loc["1", "is_splits"] == 1  # 30 images: one split
    assert summary.loc["1", "is_inception_v3"] > 1 and summary.loc["1", "is"] != summary.loc["1", "is_inception_v3"]
    p = json.loads((run / "results" / "protocol.json").read_text())["is"]
    assert p["networks"]["is"]["label"] == "IS (vit_h_14 ACC classifier, not Inception-v3)"
    assert p["networks"]["is_inception_v3"]["label"] == "IS (Inception-v3)"
    assert sha in p["networks"]["is_inception_v3"]["network"] and "not torchvision's own file" in \
        p["networks"]["is_inception_v3"]["network"]
    assert p["split_rule"] == "splits = clamp(N // 50, 1, 10) for a group of N images"
    assert "torch.Generator().manual_seed(0)" in p["permutation"]
    assert {"subject": "1", "variant": "L+I", "n": 30, "splits": 1} in p["groups"]
    text = write_report(run).read_text()
    header = [ln for ln in section(text, "Ablation").splitlines() if ln.startswith("| variant")][0]
    assert "| IS (vit_h_14 ACC classifier, not Inception-v3) | IS (Inception-v3) | SSIM |" in header
    rows = table_rows(section(text, "Ablation"))
    assert rows[0][4] == f"{summary.loc['all', 'is']:.2f}" and rows[0][5] == f"{summary.loc['all', 'is_inception_v3']:.2f}"
    assert table_rows(section(text, "Per subject"))[0][3:5] == [rows[0][4], rows[0][5]]
    proto = section(text, "Protocol")
    assert "IS (Inception-v3) (summary.csv `is_inception_v3`): Inception-v3" in proto and sha in proto
    assert "splits = clamp(N // 50, 1, 10)" in proto and "`is_n`, `is_splits`" in proto


def test_a_protocol_written_before_networks_were_recorded_still_names_the_is_network(tmp_path):
    from neuroimagen.runs.reports import write_report

    run = make_run(tmp_path, subjects=("1",), variants=("L+I",), samples=1, judge_kind="torchvision")
    path = run / "results" / "protocol.json"
    protocol = json.loads(path.read_text())
    protocol["classifier"]["identity"] = "torchvision:vit_h_14@/models/vit.pth"
    protocol["is"] = {"splits": 10, "classifier_note": "IS computed with torchvision:vit_h_14@/models/vit.pth"}
    path.write_text(json.dumps(protocol))
    text = write_report(run).read_text()
    assert "| IS (vit_h_14 ACC classifier, not Inception-v3) |" in section(text, "Ablation")
    assert "IS computed with `torchvision:vit_h_14@/models/vit.pth` (torchvision), not Inception-v3" in text
    assert "- splits: 10 splits;" in section(text, "Protocol")


# --------------------------------------------------------------------------------------------------
# N-way ACC withheld when the classifier's classes do not cover the evaluated concepts (zero-shot THINGS)

JUDGE = {"kind": "judge", "identity": "judge:abc", "label_to_class": list(range(5)),
         "label_space": "the dataset's labels (the judge is trained on them)", "spec": {"kind": "judge"}}


def _evaluated(run: Path) -> tuple[list[str], dict]:
    import pandas as pd

    from neuroimagen.runs.evaluation import evaluate

    lines: list[str] = []
    evaluate(run, log=lines.append)
    summary = pd.read_csv(run / "results" / "summary.csv", dtype={"subject": str}).set_index("subject")
    return lines, {"summary": summary, "protocol": json.loads((run / "results" / "protocol.json").read_text())}


def test_acc_is_withheld_when_the_judge_never_saw_the_test_concepts(tmp_path):
    """The judge learned labels 0-2 only; the test trials hold labels 0-4 (3 and 4 have no training image, as
    THINGS-EEG2's test concepts): ACC, ACC max, the GT accuracy and the judge's IS are n/a with the reason, in
    protocol.json, the log (one warning line) and every place of the report that shows ACC; SSIM stays."""
    from neuroimagen.runs.reference import results_block
    from neuroimagen.runs.reports import load_protocol, load_summary, write_report

    run = scored_run(tmp_path, {**JUDGE, "covered_labels": [0, 1, 2], "coverage": "the labels with training images"})
    lines, out = _evaluated(run)
    s, protocol = out["summary"], out["protocol"]
    for col in ("acc", "acc_max", "judge_gt_acc", "is", "is_std"):
        assert s[col].isna().all(), col
    assert s.loc["1", "ssim"] == pytest.approx(0.3) and s.loc["1", "acc_chance"] == pytest.approx(1 / 50)
    why = protocol["acc"]["unavailable"]
    assert why.startswith("not available: the judge is trained on the training images only, and 2 of the 5 test "
                          "concepts have none (labels 3, 4: zero-shot concepts")
    assert "PixCorr, SSIM, two-way identification, FID/KID) stand" in why
    assert protocol["acc"]["withheld"] == ["acc", "acc_max", "judge_gt_acc", "is"]
    assert protocol["is"]["unavailable"] == why and protocol["classifier"]["gt_accuracy"] is None
    assert protocol["classifier"]["gt_accuracy_unavailable"] == why
    assert "covered_labels" not in protocol["classifier"]  # the label list stays in state.json, not the report
    assert protocol["cards"]["acc"]["unavailable"] == why and "unavailable" not in protocol["cards"]["ssim"]
    assert "unavailable" not in protocol["cards"]["acc_chance"]
    warnings = [m for m in lines if "ACC withheld" in m]
    assert len(warnings) == 1 and warnings[0].startswith("evaluate: warning: ACC withheld (acc, acc_max, judge_gt_acc, "
                                                         "is are n/a): not available: the judge")

    text = write_report(run).read_text()
    note = f"> **ACC n/a:** {why}"
    ablation = section(text, "Ablation")
    assert note in ablation and ablation.index(note) > ablation.index("| variant | ACC (%)")
    assert table_rows(ablation)[0][1:3] == ["n/a", "n/a"]
    assert note in section(text, "Per subject") and note in section(text, "Judge")
    assert f"top-1 accuracy on the ground-truth test images: n/a ({why})" in section(text, "Judge")
    assert "Caution" not in text
    assert f"- **Not reported:** {why}" in section(text, "Protocol")
    block = results_block(load_summary(run), load_protocol(run), "neuroimagen demo")  # the README renderer
    assert note in block and block.index(note) > block.index("| variant |")


def test_acc_stays_when_the_classifier_covers_the_evaluated_concepts(tmp_path):
    run = scored_run(tmp_path, {**JUDGE, "covered_labels": list(range(5))})
    lines, out = _evaluated(run)
    assert out["summary"].loc["1", "acc"] == pytest.approx(0.5)
    assert "unavailable" not in out["protocol"]["acc"] and not any("ACC withheld" in m for m in lines)
    # a run scored before coverage was recorded is taken as covered
    lines, out = _evaluated(scored_run(tmp_path / "old", JUDGE))
    assert out["summary"].loc["1", "acc"] == pytest.approx(0.5) and "unavailable" not in out["protocol"]["acc"]


def test_acc_is_withheld_for_classes_missing_from_a_torchvision_class_index(tmp_path):
    """Labels 3 and 4 are not in the classifier's class index (label_to_class -1): ACC and the GT accuracy are
    n/a, the IS of the ImageNet classifier (label-free) stays."""
    clf = {**TV, "label_to_class": IMAGENET_INDEX[:3] + [-1, -1], "covered_labels": [0, 1, 2],
           "coverage": "the dataset classes whose id is in c.json: 3 of 5 (not there: '00001_aircraft_carrier' and 1 more)"}
    _, out = _evaluated(scored_run(tmp_path, clf))
    s, protocol = out["summary"], out["protocol"]
    assert s["acc"].isna().all() and s["judge_gt_acc"].isna().all() and s["is"].notna().all()
    assert protocol["acc"]["withheld"] == ["acc", "acc_max", "judge_gt_acc"] and "unavailable" not in protocol["is"]
    assert "2 of the 5 test classes (labels 3, 4) have no class in the classifier's class index (the dataset " \
           "classes whose id is in c.json: 3 of 5 (not there: '00001_aircraft_carrier'" in protocol["acc"]["unavailable"]


def test_plotting_leaves_the_users_matplotlib_backend_alone(tmp_path):
    """Importing the runs layer and drawing its figures never switches the process's matplotlib backend (it did:
    `matplotlib.use("Agg")` at import, which silenced every inline plot of a notebook that imported neuroimagen)."""
    import subprocess
    import sys

    code = f"""
import matplotlib
matplotlib.use("svg")
import neuroimagen.runs.demo, neuroimagen.runs.reports, neuroimagen.runs.sweeps
from neuroimagen.runs.training import _plot_history
_plot_history([{{"epoch": 0, "train_loss": 1.0, "val_acc": 0.5}}, {{"epoch": 1, "train_loss": 0.5, "val_acc": 0.7}}],
              __import__("pathlib").Path({str(tmp_path / "c.png")!r}), "t")
print(matplotlib.get_backend())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "svg", out.stderr
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
