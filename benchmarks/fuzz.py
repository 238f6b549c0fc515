"""Long fuzz run of the decoder: mutated, truncated and re-framed bitstreams of real models.

    python benchmarks/fuzz.py [--cases 100000] [--seed 0]

Every case must end in a clean NncError or a model the format writer can write; anything else
(another exception type, a crash, a hang) is counted and the first few are printed with the
seed that reproduces them. Exit code 1 if any case failed.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

import nnc_tool
from nnc_tool.bitstream import container

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
SOURCES = [
    ("lenet.onnx", {}),
    ("mlp_state_dict.pt", {"lossless": True}),
    ("mobilenet.onnx", {"per_channel": True}),
    ("lenet_script.pt", {}),
    ("mlp.pt2", {}),
]
SUFFIX = {"onnx": ".onnx", "torch-state-dict": ".pt", "torchscript": ".pt", "torch-export": ".pt2", "safetensors": ".safetensors"}


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        if not data:
            break
        position = rng.randrange(len(data))
        action = rng.random()
        if action < 0.4:
            data[position] ^= 1 << rng.randrange(8)
        elif action < 0.6:
            data[position] = rng.randrange(256)
        elif action < 0.8:
            data[position:position] = rng.randbytes(rng.randint(1, 16))
        elif len(data) > 1:
            del data[position : position + rng.randint(1, 16)]
    return bytes(data)


def reframe(rng: random.Random, stream: bytes) -> bytes:
    """Mutate one unit's payload behind a freshly computed CRC."""
    units = list(container.iter_units(stream))
    target = rng.randrange(len(units))
    parts = [container.stream_header()]
    for index, unit in enumerate(units):
        payload = bytes(unit.payload)
        if index == target and payload:
            payload = mutate_bytes(rng, payload)
        parts.append(container.frame_unit(unit.type, payload))
    return b"".join(parts)


def one_case(rng: random.Random, stream: bytes, tmp: Path) -> str:
    kind = rng.random()
    if kind < 0.3:
        data = mutate_bytes(rng, stream)
    elif kind < 0.5:
        data = stream[: rng.randrange(len(stream))]
    else:
        data = reframe(rng, stream)
    try:
        model = nnc_tool.decompress_model(data)
    except nnc_tool.NncError:
        return "rejected"
    try:
        nnc_tool.write_model(model, tmp / f"case{SUFFIX.get(model.format, '.bin')}")
    except nnc_tool.NncError:
        return "rejected at write"
    return "valid model"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    streams = [nnc_tool.compress_model(nnc_tool.read_model(SAMPLES / f), nnc_tool.EncodeOptions(**o))[0] for f, o in SOURCES]
    outcomes: dict[str, int] = {}
    failures = 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for case in range(args.cases):
            rng = random.Random(f"{args.seed}:{case}")
            stream = streams[case % len(streams)]
            try:
                outcome = one_case(rng, stream, Path(tmp))
            except Exception:  # noqa: BLE001 - exactly what the fuzzer looks for
                failures += 1
                outcome = "FAILED"
                if failures <= 5:
                    print(f"case {case} (seed {args.seed}) from {SOURCES[case % len(SOURCES)][0]}:", file=sys.stderr)
                    traceback.print_exc()
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if (case + 1) % 10_000 == 0:
                print(f"{case + 1} cases, {time.perf_counter() - started:.0f} s: {outcomes}", flush=True)
    elapsed = time.perf_counter() - started
    print(f"{args.cases} cases in {elapsed:.0f} s ({args.cases / elapsed:.0f}/s): {outcomes}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
