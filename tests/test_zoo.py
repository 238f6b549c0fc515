"""The real-model zoo's runner and shared measures (benchmarks/zoo.py, benchmarks/zoo/), on a tiny
local model: no wheel is downloaded here."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import zoo.models  # noqa: E402
from zoo.models.magika import features  # noqa: E402
from zoo.models.ppocr_rec import ctc_greedy  # noqa: E402
from zoo.embedding_fidelity import embedding_fidelity  # noqa: E402
from zoo.onnx_eval import batch_feed, largest_flip_margin, mask_iou, snr_db, top1_agreement  # noqa: E402


def _runner():
    spec = importlib.util.spec_from_file_location("zoo_runner", BENCHMARKS / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ctc_greedy_merges_repeats_and_drops_blanks():
    frames = np.array([[0, 3, 3, 0, 3, 5, 5, 0], [0, 0, 0, 0, 0, 0, 0, 0]])
    probabilities = np.eye(6)[frames]
    assert ctc_greedy(probabilities) == [(3, 3, 5), ()]


def test_magika_features_strip_truncate_and_pad_as_magika_does():
    config = {"beg_size": 8, "end_size": 8, "padding_token": 256, "min_file_size_for_dl": 4}
    content = b"  \n\tabcdefghijkl \n"
    row = features(content, content, len(content), config)
    assert row.dtype == np.int32
    assert list(row[:8]) == list(b"abcdefgh")  # leading whitespace stripped, first beg_size bytes
    assert list(row[8:]) == list(b"efghijkl")  # trailing whitespace stripped, last end_size bytes
    short = b"  ab\n"
    row = features(short, short, 20, config | {"min_file_size_for_dl": 2})
    # beg only loses leading whitespace and end only trailing whitespace, as in magika's code
    assert list(row) == [97, 98, 10] + [256] * 5 + [256] * 4 + [32, 32, 97, 98]
    assert features(short, short, len(short), config) is None  # too few bytes after stripping


def test_batch_feed_follows_the_inputs_layout():
    inputs = {"x": np.arange(12, dtype=np.float32).reshape(4, 3), "sr": np.array([8, 16, 16, 16], np.int64)}
    feed = batch_feed(inputs, {"x": 2, "sr": 0}, 1, 2)
    assert feed["x"].shape == (1, 3) and feed["x"][0, 0] == 3.0  # sliced along the model's batch axis
    assert feed["sr"].shape == () and feed["sr"] == 16  # one axis deeper: one sample per run
    with pytest.raises(ValueError, match="batch size must be 1"):
        batch_feed(inputs, {"x": 2, "sr": 0}, 0, 2)


def test_measures_have_exact_values():
    reference = np.array([3.0, 4.0])
    assert snr_db(reference, reference) == float("inf")
    assert snr_db(reference, reference + np.array([0.5, 0.0])) == pytest.approx(10 * np.log10(25 / 0.25))
    assert mask_iou(np.zeros(4, bool), np.zeros(4, bool)) == 100.0
    assert mask_iou(np.array([1, 1, 0, 0], bool), np.array([0, 1, 1, 0], bool)) == pytest.approx(100 / 3)
    assert top1_agreement(np.array([[0, 1], [1, 0]]), np.array([[0, 1], [0, 1]])) == 50.0
    scores = np.array([[0.1, 0.5, 0.4], [0.8, 0.1, 0.1], [0.3, 0.3, 0.4]])
    flipped = np.array([[0.1, 0.4, 0.5], [0.8, 0.1, 0.1], [0.5, 0.3, 0.2]])  # rows 0 and 2 change
    assert largest_flip_margin(scores, flipped) == pytest.approx(0.1)
    assert largest_flip_margin(scores, scores) == 0.0


def test_embedding_fidelity_says_how_near_a_tie_a_changed_neighbour_was():
    original = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    rebuilt = original.copy()
    # Row 0 turns towards rows 1 and 2, whose neighbours (each other, cosine 0.96) become row 0:
    # in the original, row 0 was 0.8 from row 1 and 0.6 from row 2.
    rebuilt[0] = [0.75, 0.66]
    fidelity = embedding_fidelity(original, rebuilt)
    assert fidelity.agreement == 50.0
    assert fidelity.extra["largest_flip_gap"] == pytest.approx(0.96 - 0.6)
    assert embedding_fidelity(original, original).extra["largest_flip_gap"] == 0.0


MEMBER = '''
from pathlib import Path
import numpy as np
from zoo.base import Fidelity, ZooModel
from zoo.onnx_eval import run, run_original, snr_db, top1_agreement

def make_inputs(path, samples):
    return {"x": np.random.default_rng(0).standard_normal((samples, 1, 3, 8, 8)).astype(np.float32)}

def evaluate(original, rebuilt, inputs):
    if FAIL:
        raise RuntimeError("boom")
    ref, test = run_original(original, inputs)["y"], run(rebuilt, inputs)["y"]
    return Fidelity(snr_db(ref, test), top1_agreement(ref, test), "top-1")

MODEL = ZooModel(name=NAME, exporter="onnx.helper", task="test classifier",
                 fetch=lambda: Path(__file__).parent / "conv_bn_gemm.onnx", make_inputs=make_inputs,
                 evaluate=evaluate, small=SMALL)
'''


def test_runner_measures_members_and_turns_failures_into_cells(tmp_path, monkeypatch, capsys):
    import onnx_factory

    members = tmp_path / "members"
    members.mkdir()
    onnx_factory.build_conv_bn_gemm(members)
    (members / "zz_good.py").write_text('NAME, FAIL, SMALL = "tiny", False, True\n' + MEMBER)
    (members / "zz_failing.py").write_text('NAME, FAIL, SMALL = "tiny-failing", True, False\n' + MEMBER)
    (members / "zz_broken.py").write_text("import no_such_module_here\n")
    monkeypatch.setattr(zoo.models, "__path__", [str(members)])
    runner = _runner()
    results = tmp_path / "results.json"

    assert runner.main(["--qps", "-38,-20", "--samples", "8", "--json", str(results)]) == 0
    table = capsys.readouterr().out
    rows = {row["name"]: row for row in json.loads(results.read_text())["models"]}
    assert set(rows) == {"tiny", "tiny-failing", "zz_broken"}
    good = rows["tiny"]
    assert [cell["qp"] for cell in good["results"]] == [-38, -20]
    # conv and fc weights and biases plus the Reshape shape; the BatchNorm is folded away by the encoder
    assert good["samples"] == 8 and good["parameters"] == 8 * 3 * 3 * 3 + 8 + 10 * 512 + 10 + 2
    fine, coarse = good["results"]
    assert fine["bytes"] > coarse["bytes"] > 0
    assert fine["output_snr_db"] > coarse["output_snr_db"] > 0
    assert 0 <= coarse["agreement"] <= fine["agreement"] <= 100
    assert all(cell["error"] == "evaluate: RuntimeError: boom" for cell in rows["tiny-failing"]["results"])
    assert rows["zz_broken"]["error"].startswith("import: ModuleNotFoundError")
    assert "ERROR evaluate: RuntimeError: boom" in table and "| tiny | onnx.helper |" in table

    assert runner.main(["--small", "--qps", "-38", "--samples", "2", "--json", str(results)]) == 0
    assert [row["name"] for row in json.loads(results.read_text())["models"]] == ["tiny"]
    with pytest.raises(SystemExit) as exit_info:
        runner.main(["--models", "nonexistent", "--json", str(results)])
    assert exit_info.value.code == 2


def test_the_bar_line_counts_members_and_names_each_miss_with_its_tie_margin():
    rows = [
        {"name": "good", "default": {"output_snr_db": 41.0, "agreement": 100.0}},
        {"name": "ties", "default": {"output_snr_db": 54.3, "agreement": 98.8, "extra": {"largest_flip_margin": 0.0021}}},
        {"name": "noisy", "default": {"output_snr_db": 28.6, "agreement": 99.4}},
        {"name": "broken", "error": "import: ModuleNotFoundError"},
    ]
    assert _runner().format_bar(rows) == (
        "default encode keeps >= 30 dB and >= 99 %: 1 of 3 members; below: "
        "ties 54.3 dB 98.8 % (largest_flip_margin 0.0021); noisy 28.6 dB 99.4 %"
    )


def test_calibrated_sweep_draws_its_data_beyond_the_evaluation_set_and_plots(tmp_path, monkeypatch, capsys):
    import onnx_factory

    members = tmp_path / "members"
    members.mkdir()
    onnx_factory.build_conv_bn_gemm(members)
    (members / "zz_good.py").write_text('NAME, FAIL, SMALL = "tiny", False, True\n' + MEMBER)
    monkeypatch.setattr(zoo.models, "__path__", [str(members)])
    runner = _runner()
    results, plot = tmp_path / "results.json", tmp_path / "rd.png"
    assert runner.main(["--qps", "-38,-32,-26", "--samples", "8", "--calib", "full", "--calib-samples", "4",
                        "--json", str(results), "--plot", str(plot)]) == 0
    assert "full, 4 inputs |" in capsys.readouterr().out
    row = json.loads(results.read_text())["models"][0]
    assert row["calibration_samples"] == 4 and row["calibrated_on_evaluation"] is False
    assert [c["qp"] for c in row["calibrated"]] == [-38, -32, -26]
    assert all(c["bytes"] > 0 and c["output_snr_db"] > 0 for c in row["calibrated"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = tmp_path / "again.svg"
    assert runner.main(["--replot", str(results), "--plot", str(again)]) == 0 and b"<svg" in again.read_bytes()[:400]


def test_the_stronger_nncodec_is_the_one_ours_beats_least():
    stronger = _runner().against_stronger({"output_snr_db": -20.0, "agreement": None},
                                          {"output_snr_db": -5.0, "agreement": 3.0})
    assert stronger == {"output_snr_db": -5.0, "agreement": 3.0}
