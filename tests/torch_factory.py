"""Small, seeded PyTorch/safetensors model files for tests.

Every `build_*` takes a directory and returns the path of the file it wrote. The same seed
always gives the same values, so tests (including end-to-end ones) can rebuild the
reference model with `make_cnn()` and compare outputs with `example_input()`.
"""
from __future__ import annotations

import collections
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

SEED = 1234
INPUT_SHAPE = (2, 3, 16, 16)


class SmallCNN(nn.Module):
    """Three conv+BatchNorm blocks and a linear head: about 57k parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean(dim=(2, 3)))


class TiedLM(nn.Module):
    """A tiny language model whose output head shares the embedding matrix."""

    def __init__(self, vocab: int = 50, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(tokens)))


def example_input(seed: int = SEED + 1) -> torch.Tensor:
    """The fixed input used to compare model outputs."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(INPUT_SHAPE, generator=generator)


def make_cnn(seed: int = SEED, dtype: torch.dtype = torch.float32) -> SmallCNN:
    """A SmallCNN in eval mode with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = SmallCNN()
    model.train()
    with torch.no_grad():  # a few batches so running stats and num_batches_tracked are not defaults
        for _ in range(3):
            model(torch.randn(INPUT_SHAPE) * 2 + 0.5)
    return model.eval().to(dtype)


def make_tied_lm(seed: int = SEED) -> TiedLM:
    torch.manual_seed(seed)
    return TiedLM().eval()


def build_state_dict(directory: Path, name: str = "cnn_state_dict.pt") -> Path:
    """torch.save(model.state_dict()) in the zip format."""
    path = Path(directory) / name
    torch.save(make_cnn().state_dict(), path)
    return path


def build_state_dict_legacy(directory: Path, name: str = "cnn_state_dict_legacy.pt") -> Path:
    """torch.save(model.state_dict()) in the pre-1.6 pickle (non-zip) format."""
    path = Path(directory) / name
    torch.save(make_cnn().state_dict(), path, _use_new_zipfile_serialization=False)
    return path


def build_state_dict_fp16(directory: Path, name: str = "cnn_fp16.pt") -> Path:
    path = Path(directory) / name
    torch.save(make_cnn(dtype=torch.float16).state_dict(), path)
    return path


def build_state_dict_bf16(directory: Path, name: str = "cnn_bf16.pt") -> Path:
    path = Path(directory) / name
    torch.save(make_cnn(dtype=torch.bfloat16).state_dict(), path)
    return path


def build_checkpoint(directory: Path, name: str = "cnn_checkpoint.ckpt") -> Path:
    """A training checkpoint: nested state_dicts, optimizer state (int keys) and plain values."""
    model = make_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    model(example_input()).square().mean().backward()
    optimizer.step()
    model.eval()
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": 3,
        "lr": 0.1,
        "note": "x",
        "flags": [True, None, 2.5, "a.b"],
        "shape": (3, 4),
        "extra.stats": collections.OrderedDict([("mean.value", torch.arange(4, dtype=torch.float32)), ("count", 7)]),
        "nan": float("nan"),
    }
    path = Path(directory) / name
    torch.save(checkpoint, path)
    return path


def build_tied_state_dict(directory: Path, name: str = "tied_lm.pt") -> Path:
    """A state_dict where embed.weight and head.weight are the same tensor, plus a slice view."""
    model = make_tied_lm()
    state = model.state_dict()
    # A second alias that is a strict view of the embedding storage (first 10 rows).
    state["embed_head_rows"] = state["embed.weight"][:10]
    path = Path(directory) / name
    torch.save(state, path)
    return path


def build_torchscript(directory: Path, name: str = "cnn.torchscript.pt") -> Path:
    path = Path(directory) / name
    with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.13 but still in the wild
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(make_cnn()), path, _extra_files={"notes.txt": b"seeded test model"})
    return path


def build_torch_export(directory: Path, name: str = "cnn.pt2") -> Path:
    path = Path(directory) / name
    torch.export.save(torch.export.export(make_cnn(), (example_input(),)), path)
    return path


def build_tied_torchscript(directory: Path, name: str = "tied_lm.torchscript.pt") -> Path:
    path = Path(directory) / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(make_tied_lm()), path)
    return path


def build_tied_torch_export(directory: Path, name: str = "tied_lm.pt2") -> Path:
    path = Path(directory) / name
    torch.export.save(torch.export.export(make_tied_lm(), (example_tokens(),)), path)
    return path


def example_tokens() -> torch.Tensor:
    """The fixed input for TiedLM."""
    return torch.tensor([[1, 2, 3, 49], [0, 5, 7, 11]])


def _save_safetensors(model: nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, path, metadata={"format": "pt", "source": "tests.torch_factory"})
    return path


def build_safetensors(directory: Path, name: str = "cnn.safetensors") -> Path:
    return _save_safetensors(make_cnn(), Path(directory) / name)


def build_safetensors_fp16(directory: Path, name: str = "cnn_fp16.safetensors") -> Path:
    return _save_safetensors(make_cnn(dtype=torch.float16), Path(directory) / name)


def build_safetensors_bf16(directory: Path, name: str = "cnn_bf16.safetensors") -> Path:
    return _save_safetensors(make_cnn(dtype=torch.bfloat16), Path(directory) / name)


def build_pickled_module(directory: Path, name: str = "cnn_module.pt") -> Path:
    """torch.save of a whole nn.Module: needs arbitrary unpickling, so it must be refused."""
    path = Path(directory) / name
    torch.save(make_cnn(), path)
    return path


# Name -> (builder, format detect_format should report), for parametrised end-to-end tests.
BUILDERS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "state_dict": (build_state_dict, "torch-state-dict"),
    "state_dict_legacy": (build_state_dict_legacy, "torch-state-dict"),
    "state_dict_fp16": (build_state_dict_fp16, "torch-state-dict"),
    "state_dict_bf16": (build_state_dict_bf16, "torch-state-dict"),
    "checkpoint": (build_checkpoint, "torch-state-dict"),
    "tied_state_dict": (build_tied_state_dict, "torch-state-dict"),
    "torchscript": (build_torchscript, "torchscript"),
    "tied_torchscript": (build_tied_torchscript, "torchscript"),
    "tied_torch_export": (build_tied_torch_export, "torch-export"),
    "torch_export": (build_torch_export, "torch-export"),
    "safetensors": (build_safetensors, "safetensors"),
    "safetensors_fp16": (build_safetensors_fp16, "safetensors"),
    "safetensors_bf16": (build_safetensors_bf16, "safetensors"),
}
