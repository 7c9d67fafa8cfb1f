"""scripts/demo_page.py (the page `make demo` ends with) and scripts/demo_step.py, on a small fake demo_out/."""
from __future__ import annotations

import json
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.errors import UserError
from scripts import demo_page, demo_step


def png(path: Path, size=(28, 28)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(path)
    return path


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def step(root: Path, name: str, seconds: float | None = None, skipped: str | None = None) -> None:
    rec = {"name": name, "skipped": skipped} if skipped else {
        "name": name, "command": f"python do_{name}.py --out {root}", "seconds": seconds, "returncode": 0}
    write_json(root / "steps" / f"{name}.json", rec)


P1_ACC = {"folder": "demo_out/p1", "mean_accuracy": 0.9135,
          "sets": {"mnistm": {"classifier": "MnistmNet", "grader": "this project's MNIST-M classifier",
                              "checkpoint": "checkpoints/mnistm_classifier.safetensors",
                              "correct": 487, "total": 500, "accuracy": 0.974},
                   "svhn": {"classifier": "SvhnNet", "grader": "this project's SVHN classifier",
                            "checkpoint": "checkpoints/svhn_classifier.safetensors",
                            "correct": 426, "total": 500, "accuracy": 0.852}}}


@pytest.fixture()
def demo(tmp_path) -> Path:
    root = tmp_path / "demo_out"
    step(root, "p1_sample", 61.5)
    step(root, "p1_figures", 20.0)
    fig = png(root / "p1_figs" / "grid_mnistm.png")
    write_json(Path(f"{fig}.json"), {"what": "MNIST-M samples, 10x10", "checkpoint": "checkpoints/p1_ddpm.safetensors",
                                     "sampler": "dpmpp2m", "steps": 12, "seed": 42,
                                     "command": "python p1_ddpm/report.py --out demo_out/p1_figs"})
    png(root / "p1_figs" / "reverse_process.png")  # no sidecar: captioned from the page's own list
    png(root / "p1_figs" / "stray.png")  # neither: not a report figure, left out
    write_json(root / "p1_accuracy.json", P1_ACC)
    step(root, "iclevr_sample", 30.0)
    write_json(root / "iclevr" / "score_test.json",
               {"judge": "own", "grader": "this project's judge (iclevr_judge)", "checkpoint": "checkpoints/j",
                "image_count": 32, "hits": 77, "total": 81, "accuracy": 77 / 81})
    step(root, "p2_sample", skipped="FACE_DIR is not set")
    step(root, "p3_data", 3.0)
    step(root, "p3_generate", skipped="SD_PATH is not set")
    step(root, "p4_usps", 4.0)
    write_json(root / "p4" / "usps_accuracy.json",
               {"pred": "x.csv", "labels": "assets/p4/usps_labels.csv", "correct": 9, "total": 10, "accuracy": 0.9,
                "missing": 0})
    # p5: no step at all
    return root


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def build(root: Path, *extra) -> str:
    out = demo_page.main([str(root), *extra])
    return Path(out).read_text()


def strip_tags(text: str) -> str:
    import re
    return re.sub(r"<[^>]+>", "", text)


def section(page: str, key: str) -> str:
    start = page.index(f'<h2 id="{key}">')
    end = page.find("<h2 ", start + 1)
    return page[start:end if end > 0 else None]


def test_every_image_exists_and_the_page_is_self_contained(demo):
    page = build(demo)
    parser = Images()
    parser.feed(page)
    assert len(parser.srcs) == 2  # grid_mnistm.png (sidecar) and reverse_process.png (known name); not stray.png
    for src in parser.srcs:
        assert not src.startswith(("/", "http")), src
        assert (demo / src).is_file(), src
    assert "script" not in parser.tags and "link" not in parser.tags
    assert "http://" not in page and "https://" not in page and "@import" not in page
    # an --out elsewhere links the same images relatively from there
    other = demo.parent / "site" / "page.html"
    demo_page.main([str(demo), "--out", str(other), "--title", "HW2 full runs"])
    parser = Images()
    text = other.read_text()
    parser.feed(text)
    assert all((other.parent / src).resolve().is_file() for src in parser.srcs)
    assert "<title>HW2 full runs</title>" in text


def test_tables_are_filled_from_the_json(demo):
    page = build(demo)
    p1 = section(page, "p1")
    for text in ("97.4%", "85.2%", "91.3%", "487", "426", "this project&#x27;s MNIST-M classifier",
                 "checkpoints/mnistm_classifier.safetensors", "this project&#x27;s SVHN classifier"):
        assert text in p1, text
    # captions: the sidecar's settings and command; the known figure's caption without one
    assert "dpmpp2m" in p1 and "seed 42" in p1 and "python p1_ddpm/report.py --out demo_out/p1_figs" in strip_tags(p1)
    assert "reverse process" in p1
    assert "python do_p1_sample.py" in strip_tags(p1)  # the step's command
    ic = section(page, "iclevr")
    assert "77/81" in ic and "95.1%" in ic and "iclevr_judge" in ic
    p4 = section(page, "p4")
    assert "90.0%" in p4 and "assets/p4/usps_labels.csv" in p4
    summary = page[:page.index('<h2 id="p1">')]
    assert "MNIST-M 97.4% (our MNIST-M net)" in summary and "SVHN 85.2% (our SVHN net)" in summary
    assert ">82 s<" in summary  # P1's two steps, 81.5 s
    assert "test 95.1% (our judge)" in summary


def test_a_problem_that_did_not_run_says_what_it_needs(demo):
    page = build(demo)
    p2 = section(page, "p2")
    assert "Not run: FACE_DIR is not set" in p2 and "Needs:" in p2 and "FACE_DIR=/path/to/hw2_data/face" in p2
    p3 = section(page, "p3")
    assert "Partly run: SD_PATH is not set" in p3 and "SD_PATH=/path/to/sd-v1-4.ckpt" in p3
    p5 = section(page, "p5")
    assert "Not run." in p5 and "CLIP_WEIGHTS" in p5
    assert "Needs:" not in section(page, "p1")
    # the order of the course
    keys = [page.index(f'<h2 id="{k}">') for k in ("p1", "iclevr", "p2", "p3", "p4", "p5")]
    assert keys == sorted(keys)


def test_full_size_run_folder(tmp_path):
    root = tmp_path / "runs"
    write_json(root / "p4_report" / "results.json", {"device": "cpu", "results": {
        "mnistm_usps": {"source": {"test_acc": 0.7}, "dann": {"test_acc": 0.81}, "target": {"test_acc": 0.97}},
        "mnistm_svhn": {"source": {"test_acc": 0.3}, "dann": {"test_acc": 0.42}, "target": {"test_acc": 0.6}}}})
    fig = png(root / "p4_report" / "tsne_mnistm_usps_digit.png")
    write_json(Path(f"{fig}.json"), {"what": "t-SNE by digit", "command": "python p4_dann/report.py --out x"})
    write_json(root / "p2_mse.json", {"per_image": {"00": 1.5, "01": 2.5}, "mean": 2.0})
    page = build(root)
    assert "DANN USPS 81.0%, SVHN 42.0% (target test split)" in page
    assert "MNIST-M → USPS" in page and "97.0%" in page and "t-SNE by digit" in page
    assert "python p4_dann/report.py --out x" in strip_tags(page)
    assert "mean MSE 2.000 (under the pass mark 20)" in page
    assert "Not found." in section(page, "p3") and "Needs:" in section(page, "p3")


@pytest.mark.parametrize("broken", ["p1_accuracy.json", "iclevr/score_test.json", "steps/p1_sample.json",
                                    "p1_figs/grid_mnistm.png.json"])
def test_bad_json_is_one_line_naming_the_file(demo, broken, capsys):
    (demo / broken).write_text('{"sets": {"mnistm": ')
    with pytest.raises(SystemExit) as e:
        demo_page.main([str(demo)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(demo / broken) in err[0], err


def test_json_without_the_numbers_names_the_file_and_key(demo):
    write_json(demo / "p1_accuracy.json", {"sets": {"mnistm": {"total": 3}}, "mean_accuracy": 0.5})
    with pytest.raises(UserError, match=r"p1_accuracy\.json: missing 'accuracy'"):
        demo_page.build_page(demo, "t", demo)
    write_json(demo / "p1_accuracy.json", {**P1_ACC, "mean_accuracy": "high"})
    with pytest.raises(UserError, match=r"p1_accuracy\.json: 'mean_accuracy' should be a number"):
        demo_page.build_page(demo, "t", demo)
    with pytest.raises(SystemExit):
        demo_page.main([str(demo / "nope")])


def test_demo_step_records_command_time_and_figure(tmp_path, monkeypatch):
    out = tmp_path / "demo_out"
    fig = tmp_path / "f.png"
    code = f"from PIL import Image; Image.new('RGB', (4, 4)).save({str(fig)!r})"
    with pytest.raises(SystemExit) as e:
        demo_step.main([str(out), "p1_thing", "--figure", str(fig), "--caption", "a test figure",
                        "--info", "seed=7", "--", sys.executable, "-c", code])
    assert e.value.code == 0
    rec = json.loads((out / "steps" / "p1_thing.json").read_text())
    assert rec["command"].startswith("python -c ") and rec["returncode"] == 0 and rec["seconds"] >= 0
    side = json.loads(Path(f"{fig}.json").read_text())
    assert side == {"what": "a test figure", "seed": 7, "command": rec["command"]}
    demo_step.main([str(out), "p2_sample", "--skip", "FACE_DIR is not set"])
    assert json.loads((out / "steps" / "p2_sample.json").read_text())["skipped"] == "FACE_DIR is not set"
    demo_step.main([str(tmp_path / "fresh"), "p2_sample", "--skip", "FACE_DIR is not set"])
    assert not (tmp_path / "fresh").exists()  # a demo part run alone, with nothing to do, creates no folder
    with pytest.raises(SystemExit) as e:  # a failing command: its exit status, and recorded
        demo_step.main([str(out), "p3_fail", "--", sys.executable, "-c", "raise SystemExit(3)"])
    assert e.value.code == 3
    assert json.loads((out / "steps" / "p3_fail.json").read_text())["returncode"] == 3
    assert "failed at step p3_fail" in build(out)


def test_mnistm_scored_by_our_classifier_without_the_course_lenet(tmp_path):
    """The demo scores every folder it writes: without Classifier.pth, MNIST-M goes to the shipped MnistmNet."""
    from scripts import evaluate_digits
    from scripts.evaluate_digits import DEFAULT_MNISTM_CHECKPOINT
    meta = json.loads(DEFAULT_MNISTM_CHECKPOINT.with_suffix(".json").read_text())
    assert meta["metrics"]["test_accuracy"] > 0.9 and meta["metrics"]["val_accuracy"] > 0.9
    assert meta["config"]["train"]["dataset"] == "mnistm"
    rng = np.random.default_rng(0)
    for d in range(3):
        folder = tmp_path / "gen" / "mnistm"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(folder / f"{d}_001.png")
    js = tmp_path / "acc.json"
    evaluate_digits.main(["--folder", str(tmp_path / "gen"), "--json", str(js)])
    r = json.loads(js.read_text())["sets"]["mnistm"]
    assert r["classifier"] == "MnistmNet" and r["total"] == 3
    assert r["checkpoint"] == "checkpoints/mnistm_classifier.safetensors" and "MNIST-M classifier" in r["grader"]


def judge_block(items, iou, follow, circle, circle_items, background, two, two_items) -> dict:
    """One group of the fill50k_judge block, as p3_controlnet/fill50k_judge.summarise writes it."""
    return {"items": items, "colour_following_share": follow, "circle_right_share": circle,
            "circle_items": circle_items, "background_right_share": background, "background_items": items,
            "both_named_circles_share": two, "two_circle_items": two_items, "striped_share": 0.0,
            "iou_mean": iou, "iou_items": items}


# scripts/evaluate_controlnet.py --pred OUT --prompts P --source S --json (no --gt, no CLIP: the mini-SD demo)
P3_JUDGE = {"images": 40, "fill50k_judge": {
    **judge_block(40, 0.9125, 0.925, 0.95, 38, 0.975, 0.8, 10),
    "unparsed_items": 0, "unparsed": [], "circles_from": "control",
    "by_circles": {"1": judge_block(20, 0.93, 0.95, 0.944, 18, 1.0, None, 0),
                   "2": judge_block(20, 0.895, 0.9, 0.95, 20, 0.95, 0.8, 10)}},
    "skipped": ["colour_iou: needs --gt and --prompts with Fill50k prompts naming every colour",
                "clip_score: needs --prompts and --clip-weights (a local CLIP weights file of --clip-arch)",
                "fid: needs --gt and --fid-weights"]}


def test_p3_offline_judge_table_and_headline(demo):
    write_json(demo / "p3_scores.json", P3_JUDGE)
    png(demo / "p3" / "0.png", (64, 64))
    page = build(demo)
    p3 = section(page, "p3")
    for text in ("mask IoU vs the control", "0.912", "92.5%", "circle colour right", "95.0%", ">38<",
                 "background right", "97.5%", "both named circles right", "80.0%", ">10<",
                 "1 circle (items)", "0.930 (20)", "— (0)", "2 circles (items)", "80.0% (10)",
                 "circles counted in the control", "Not scored: colour_iou, clip_score, fid"):
        assert text in p3, text
    assert "CLIP score" not in p3  # the CLIP / FID table only when the JSON has its numbers
    summary = page[:page.index('<h2 id="p1">')]
    assert "mask IoU 0.91, colours right 92.5% (offline Fill50k judge)" in summary
    assert "checkpoints/mini_controlnet" in p3  # the problem's needs (the demo's p3_generate was skipped)
    # an SD v1.4 run with CLIP weights: the judge's table and the CLIP rows, both in the headline
    write_json(demo / "p3_scores.json", {**P3_JUDGE, "colour_iou": 0.71, "clip_score": 30.5, "clip_cosine": 0.305})
    p3 = section(build(demo), "p3")
    assert "mask IoU vs the control" in p3 and "CLIP score" in p3 and "30.50" in p3 and "0.710" in p3
    assert "mask IoU 0.91, colours right 92.5% (offline Fill50k judge), CLIP score 30.50" in build(demo)


def ti_shares(images, colours, background, token, striped, concept) -> dict:
    return {"images": images, "colour_following_share": colours, "background_right_share": background,
            "token_colour_share": token, "striped_share": striped, "concept_share": concept}


def ti_report(stand_ins: dict, prompts: list, entries: dict) -> dict:
    """scripts/evaluate_ti.py --judge fill50k --report: per prompt, pooled per entry in "concepts"."""
    rows = [{"concept": entry, "prompt_index": i, "prompt": text,
             "judged_as": {"text": text, "circles": ["<new1>"], "background": "pink", "striped": [False],
                           "token_colour": [True]},
             **shares, "verdicts": [{"file": f"source{entry}_prompt{i}_0.png", "colour_following": True,
                                     "background_right": True, "token_colour": True, "striped_as_asked": None,
                                     "concept": True, "circles_found": 1, "circle_right": [True],
                                     "striped": [False], "circle_lab": [[89.9, -68.1, 85.8]],
                                     "background_lab": [12.97, 47.5, -64.7], "notes": []}]}
            for entry, i, text, shares in prompts]
    return {"judge": "fill50k", "aliases": {"<new1>": "chartreuse"}, "style_tokens": {"<new2>": "stripes"},
            "expect_concept": stand_ins, "total": len(rows),
            "mean_concept_share": sum(r["concept_share"] for r in rows) / len(rows), "concepts": entries,
            "prompts": rows}


def test_p5_mini_sd_judge_tables_headline_and_figure(demo):
    write_json(demo / "p5_scores_ti.json", ti_report({}, [
        ("0", 0, "<new1> circle with pink background", ti_shares(25, 0.92, 0.96, 0.92, None, 0.92)),
        ("1", 0, "<new2> red circle with navy background", ti_shares(25, 0.88, 1.0, None, 0.84, 0.84))],
        {"0": ti_shares(25, 0.92, 0.96, 0.92, None, 0.92), "1": ti_shares(25, 0.88, 1.0, None, 0.84, 0.84)}))
    write_json(demo / "p5_scores_init_word.json", ti_report({"<new1>": "green", "<new2>": "white"}, [
        ("0", 0, "green circle with pink background", ti_shares(25, 0.04, 0.96, 0.04, None, 0.04)),
        ("1", 0, "white red circle with navy background", ti_shares(25, 0.08, 1.0, None, 0.08, 0.08))],
        {"0": ti_shares(25, 0.04, 0.96, 0.04, None, 0.04), "1": ti_shares(25, 0.08, 1.0, None, 0.08, 0.08)}))
    for method in ("ti", "init_word"):
        for entry in ("0", "1"):
            png(demo / f"p5_gen_{method}" / entry / "0" / f"source{entry}_prompt0_0.png", (64, 64))
    fig = png(demo / "p5_figs" / "ti_prompts.png", (256, 128))
    write_json(Path(f"{fig}.json"), {"what": "textual inversion, first 5 images per prompt; rows entry/prompt index",
                                     "command": "python p5_personalization/report.py --out demo_out/p5_figs/x.png"})
    step(demo, "p5_generate_ti", 12.0)
    page = build(demo)
    p5 = section(page, "p5")
    tables = p5.split("<h3>")
    ti = next(t for t in tables if t.startswith("Offline Fill50k judge on the learned tokens"))
    base = next(t for t in tables if t.startswith("Offline Fill50k judge on the init-word baseline"))
    for text in ("concept shown", "&lt;new1&gt; circle with pink background", "92.0%", "84.0%", "all its prompts"):
        assert text in ti, text
    for text in ("green circle with pink background", "white red circle with navy background", "4.0%", "8.0%"):
        assert text in base, text
    assert "&lt;new1&gt; = chartreuse, &lt;new2&gt; = stripes" in ti
    summary = page[:page.index('<h2 id="p1">')]
    assert "concept shown with the tokens vs the init words: &lt;new1&gt; 92.0% vs 4.0%, &lt;new2&gt; 84.0% vs " \
           "8.0% (offline judge)" in summary
    parser = Images()
    parser.feed(p5)
    assert "p5_figs/ti_prompts.png" in parser.srcs and all((demo / src).is_file() for src in parser.srcs)
    assert "p5_gen_init_word/1/0/source1_prompt0_0.png" in parser.srcs
    assert "init word: 1 / 0: white red circle with navy background" in p5
    assert "textual inversion, first 5 images per prompt" in p5


def test_p5_clip_report_still_renders(demo):
    """SD v1.4 runs write the course's CLIP grading (no "judge" key): its table, as before."""
    write_json(demo / "p5_scores_ti.json", {"clip_model": "ViT-B-32", "passed": 1, "graded": 2, "prompts": [
        {"concept": "0", "prompt": "a photo of <new1>", "image_score": 81.25, "text_score": 30.5,
         "baseline": [75, 28], "pass": True}]})
    step(demo, "p5_score_ti", 3.0)  # a demo problem with no step that ran shows only what it needs
    page = build(demo)
    assert "81.250" in section(page, "p5") and "ti: 1/2 prompts pass" in page


@pytest.mark.parametrize("name,data,key", [
    ("p3_scores.json", {**P3_JUDGE, "fill50k_judge": {k: v for k, v in P3_JUDGE["fill50k_judge"].items()
                                                      if k != "iou_mean"}}, "iou_mean"),
    ("p5_scores_init_word.json", {"judge": "fill50k", "aliases": {}, "style_tokens": {}, "prompts": []},
     "concepts")])
def test_judge_json_without_a_needed_key_is_one_line_naming_the_file(demo, name, data, key, capsys):
    write_json(demo / name, data)
    with pytest.raises(SystemExit) as e:
        demo_page.main([str(demo)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{demo / name}: missing {key!r}" in err[0], err
