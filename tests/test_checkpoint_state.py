"""Training checkpoints: optimizer state is kept exactly, or dropped with --drop-optimizer-state."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from nnc_tool import api
from nnc_tool.cli import main
from nnc_tool.errors import UsageError
from nnc_tool.formats import optimizer_state_tensors, read_model
from nnc_tool.model import TensorRole


def _trained(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """A small network after one Adam step (so the optimizer holds exp_avg / exp_avg_sq moments)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
    net(torch.randn(8, 16)).square().mean().backward()
    optimizer.step()
    scheduler.step()
    return net, optimizer, scheduler


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    net, optimizer, _ = _trained()
    path = tmp_path_factory.mktemp("ckpt") / "train.pt"
    torch.save({"model_state": net.state_dict(), "optimizer_state": optimizer.state_dict(), "step": 1, "epoch": 0}, path)
    return path


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_dropping_the_optimizer_state_keeps_a_loadable_model_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    report = api.encode(checkpoint, tmp_path / "m.nnc", drop_optimizer_state=True)
    assert report.dropped_optimizer_tensors == 12  # exp_avg and exp_avg_sq of 4 parameters, 4 step counters
    assert report.optimizer_state_tensors == 0 and report.optimizer_state_bytes == 0
    api.decode(tmp_path / "m.nnc", tmp_path / "m.pt")
    original, decoded = _load(checkpoint), _load(tmp_path / "m.pt")
    assert list(decoded) == ["model_state", "step", "epoch"]
    assert decoded["step"] == 1 and decoded["epoch"] == 0
    steps = {t.name: t.step for t in report.tensors}
    for key, value in original["model_state"].items():
        error = float((decoded["model_state"][key] - value).abs().max())
        assert error <= steps[f"model_state/{key}"] / 2 * (1 + 1e-6), key
    # The decoded checkpoint loads into the network it came from.
    net, _, _ = _trained()
    net.load_state_dict(decoded["model_state"])


def test_kept_optimizer_state_survives_exactly_and_the_report_names_its_bytes(checkpoint: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["encode", str(checkpoint), "-o", str(tmp_path / "m.nnc"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["optimizer_state_tensors"] == 12 and report["dropped_optimizer_tensors"] is None
    assert 0 < report["optimizer_state_bytes"] < report["bitstream_bytes"]
    optimizer_names = {t["name"] for t in report["tensors"] if t["name"].startswith("optimizer_state/")}
    assert report["optimizer_state_bytes"] == sum(t["coded_bytes"] for t in report["tensors"] if t["name"] in optimizer_names)

    api.decode(tmp_path / "m.nnc", tmp_path / "m.pt")
    original, decoded = _load(checkpoint)["optimizer_state"], _load(tmp_path / "m.pt")["optimizer_state"]
    assert decoded["param_groups"] == original["param_groups"]
    for index, state in original["state"].items():
        for key, value in state.items():
            assert torch.equal(decoded["state"][index][key], value), (index, key)

    text = CliRunner().invoke(main, ["encode", str(checkpoint), "-o", str(tmp_path / "m2.nnc")]).output
    assert "optimizer state: " in text and "--drop-optimizer-state keeps only the model" in text


def test_optimizer_state_is_recognised_by_its_shape_under_any_key(tmp_path: Path) -> None:
    net, optimizer, scheduler = _trained(1)
    path = tmp_path / "lightning.ckpt"
    torch.save({"weights": net.state_dict(), "trainer": optimizer.state_dict(), "optimizer_states": [optimizer.state_dict()],
                "sched": scheduler.state_dict(), "global_step": 5}, path)
    model = read_model(path)
    held = optimizer_state_tensors(model)
    assert held == {t.name for t in model.tensors if not t.name.startswith("weights/")}
    # Kept, they are coded exactly (Adam moments are far below the weights' quantization step).
    assert all(t.role == TensorRole.EXACT for t in model.tensors if t.name in held)
    api.encode(path, tmp_path / "l.nnc", drop_optimizer_state=True)
    api.decode(tmp_path / "l.nnc", tmp_path / "l.ckpt")
    assert list(_load(tmp_path / "l.ckpt")) == ["weights", "global_step"]


def test_the_flag_on_a_model_without_optimizer_state_changes_nothing(tmp_path: Path) -> None:
    net, _, _ = _trained(2)
    path = tmp_path / "plain.pt"
    torch.save(net.state_dict(), path)
    plain = api.encode(path, tmp_path / "a.nnc")
    flagged = api.encode(path, tmp_path / "b.nnc", drop_optimizer_state=True)
    assert flagged.dropped_optimizer_tensors == 0 and plain.dropped_optimizer_tensors is None
    assert (tmp_path / "a.nnc").read_bytes() == (tmp_path / "b.nnc").read_bytes()
    result = CliRunner().invoke(main, ["encode", str(path), "-o", str(tmp_path / "c.nnc"), "--drop-optimizer-state"])
    assert result.exit_code == 0 and "no optimizer state, nothing to drop" in result.output


def test_a_file_of_nothing_but_optimizer_state_cannot_drop_it(tmp_path: Path) -> None:
    _, optimizer, _ = _trained(3)
    path = tmp_path / "optim.pt"
    torch.save(optimizer.state_dict(), path)
    with pytest.raises(UsageError, match="nothing but optimizer state"):
        api.encode(path, None, drop_optimizer_state=True)
    result = CliRunner().invoke(main, ["encode", str(path), "-o", str(tmp_path / "o.nnc"), "--drop-optimizer-state"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
