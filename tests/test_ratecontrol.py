"""Rate control: the QP search and its use by encode."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nnc_tool import api
from nnc_tool.errors import UsageError
from nnc_tool.ratecontrol import RateTarget, Trial, search_qp

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


def _sizes(qp: int) -> Trial:
    return Trial(qp, bitstream_bytes=int(100_000 * 2 ** (-qp / 8)) + 1000)


def test_size_target_picks_the_finest_qp_that_fits() -> None:
    report = search_qp(RateTarget(size=50_000), _sizes, original_bytes=400_000)
    assert _sizes(report.chosen_qp).bitstream_bytes <= 50_000 < _sizes(report.chosen_qp - 1).bitstream_bytes
    assert len(report.trials) <= 9  # a bisection, not a scan


def test_ratio_target_is_a_size_target() -> None:
    by_ratio = search_qp(RateTarget(ratio=8.0), _sizes, original_bytes=400_000)
    by_size = search_qp(RateTarget(size=50_000), _sizes, original_bytes=400_000)
    assert by_ratio.chosen_qp == by_size.chosen_qp
    assert by_ratio.achieved.endswith("x")


def test_quality_target_picks_the_coarsest_qp_that_meets_it() -> None:
    def measure(qp: int) -> Trial:
        return Trial(qp, 1000, snr_db=-1.5 * qp - 20)  # 40 dB at QP -40, falling with QP

    report = search_qp(RateTarget(snr_db=40.0), measure, original_bytes=1)
    assert report.chosen_qp == -40


def test_unreachable_targets_say_what_is_reachable() -> None:
    with pytest.raises(UsageError, match=r"cannot meet bitstream <= 10 B: the smallest bitstream \(QP 32\) is"):
        search_qp(RateTarget(size=10), _sizes, original_bytes=1)
    with pytest.raises(UsageError, match="even QP -96 only reaches 5.00 dB"):
        search_qp(RateTarget(snr_db=90.0), lambda qp: Trial(qp, 1, snr_db=5.0), original_bytes=1)


@pytest.mark.parametrize("kwargs", [{}, {"size": 1, "ratio": 2.0}, {"size": 0}, {"ratio": -1.0}, {"max_accuracy_drop": -1}])
def test_bad_targets_are_rejected(kwargs: dict) -> None:
    with pytest.raises(UsageError):
        RateTarget(**kwargs)


def test_encode_meets_a_size_target_with_the_finest_qp(tmp_path: Path) -> None:
    model = SAMPLES / "lenet.onnx"
    report = api.encode(model, tmp_path / "m.nnc", target=RateTarget(size=9000))
    assert report.bitstream_bytes == (tmp_path / "m.nnc").stat().st_size <= 9000
    assert report.qp == report.rate_control.chosen_qp
    finer = api.encode(model, None, api.EncodeOptions(qp=report.qp - 1))
    assert finer.bitstream_bytes > 9000
    # The written stream is the one a plain encode at the chosen QP writes.
    plain = api.encode(model, tmp_path / "plain.nnc", api.EncodeOptions(qp=report.qp))
    assert (tmp_path / "plain.nnc").read_bytes() == (tmp_path / "m.nnc").read_bytes()
    assert plain.bitstream_bytes == report.bitstream_bytes


def test_encode_meets_an_accuracy_target_on_real_data(digits_test) -> None:
    x, y = digits_test
    report = api.encode(SAMPLES / "lenet.onnx", None, target=RateTarget(max_accuracy_drop=1.0), evaluation=(x, y))
    chosen = next(t for t in report.rate_control.trials if t.qp == report.qp)
    original = float(report.rate_control.achieved.split("original ")[1].split(" %")[0])
    assert original - chosen.accuracy <= 1.0
    coarser = [t for t in report.rate_control.trials if t.qp > report.qp]
    assert coarser and all(original - t.accuracy > 1.0 for t in coarser if t.qp == report.qp + 1)


def test_encode_meets_an_snr_target(samples_dir: Path) -> None:
    with np.load(samples_dir / "digits_calib.npz") as data:
        calib = data["x"]
    report = api.encode(samples_dir / "mlp.onnx", None, target=RateTarget(snr_db=35.0), calibration=calib)
    chosen = next(t for t in report.rate_control.trials if t.qp == report.qp)
    assert chosen.snr_db >= 35.0
    assert any(t.qp > report.qp and t.snr_db < 35.0 for t in report.rate_control.trials)


def test_quality_targets_need_their_data(samples_dir: Path) -> None:
    with pytest.raises(UsageError, match="needs calibration inputs"):
        api.encode(samples_dir / "mlp.onnx", None, target=RateTarget(snr_db=30.0))
    with pytest.raises(UsageError, match="needs labelled data"):
        api.encode(samples_dir / "mlp.onnx", None, target=RateTarget(max_accuracy_drop=1.0))
    with pytest.raises(UsageError, match="does not combine with lossless"):
        api.encode(samples_dir / "mlp.onnx", None, api.EncodeOptions(lossless=True), target=RateTarget(size=1000))


def test_cli_rate_control(tmp_path: Path, samples_dir: Path) -> None:
    from click.testing import CliRunner

    from nnc_tool.cli import main

    out = tmp_path / "m.nnc"
    result = CliRunner().invoke(main, ["encode", str(samples_dir / "lenet.onnx"), "-o", str(out), "--target-size", "9KB"])
    assert result.exit_code == 0, result.output
    assert "rate control (bitstream <= 9000 B): QP" in result.output
    assert out.stat().st_size <= 9000
    both = CliRunner().invoke(main, ["encode", str(samples_dir / "lenet.onnx"), "-o", str(out),
                                     "--target-size", "9KB", "--target-ratio", "4"])
    assert both.exit_code == 2 and "give one of" in both.output
    unreachable = CliRunner().invoke(main, ["encode", str(samples_dir / "lenet.onnx"), "-o", str(tmp_path / "x.nnc"),
                                            "--target-size", "10"])
    assert unreachable.exit_code == 2 and "cannot meet" in unreachable.output
    assert not (tmp_path / "x.nnc").exists()


def test_cli_rate_control_per_model_in_a_batch(tmp_path: Path, samples_dir: Path) -> None:
    """With -d each model meets the target on its own; one that cannot is reported and skipped."""
    from click.testing import CliRunner

    from nnc_tool.cli import main

    models = [str(samples_dir / f"{name}.onnx") for name in ("lenet", "mlp", "resnet")]
    result = CliRunner().invoke(main, ["encode", *models, "-d", str(tmp_path), "--target-ratio", "6", "--jobs", "1"])
    assert result.exit_code == 0, result.output
    assert result.output.count("rate control (ratio >= 6") == 3
    for name in ("lenet", "mlp", "resnet"):
        original = (samples_dir / f"{name}.onnx").stat().st_size
        assert original / (tmp_path / f"{name}.nnc").stat().st_size >= 6.0
    # 1.2 KB fits lenet's smallest bitstream (920 B) but not resnet's (1485 B): resnet fails alone.
    out = tmp_path / "sized"
    sized = CliRunner().invoke(main, ["encode", models[0], models[2], "-d", str(out), "--target-size", "1200"])
    assert sized.exit_code == 2
    assert (out / "lenet.nnc").stat().st_size <= 1200 and not (out / "resnet.nnc").exists()
    assert "resnet.onnx" in sized.output and "cannot meet" in sized.output
