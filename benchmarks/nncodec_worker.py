"""Code a set of float32 tensors with NNCodec (MPEG NNC reference software) and decode them again.

Runs INSIDE the NNCodec virtual environment (benchmarks/setup_nncodec.sh), never in nnc's own:
nncodec needs numpy<2. benchmarks/rd_vs_nncodec.py calls it as a subprocess.

    $NNCODEC_VENV/bin/python benchmarks/nncodec_worker.py IN.npz OUT_DIR --qp -38 -34 ... [--nonweight-qp -75] [--no-dq]

IN.npz holds named float32 arrays (the tensors to code, in model order). For every QP the worker
encodes all of them into one NNCodec bitstream with `nncodec.nn.encode`, decodes it with
`nncodec.nn.decode`, and writes the reconstruction to OUT_DIR/rec_qp{QP}.npz (same names, shapes
and dtype as the input) and the bitstream to OUT_DIR/bitstream_qp{QP}.nnc. It prints one JSON
document on stdout (NNCodec's own chatter goes to stderr):

    {"nncodec_version": "2.1.3", "settings": {...}, "results": [
        {"qp": -38, "bytes": 12345, "encode_s": 0.41, "decode_s": 0.22, "output": "...",
         "units": {"start": 4, "mps": 8, "tpl": 6, "ndu": 12164, "ndu_count": 6,
                   "ndu_sizes": [...one per tensor, in input order...]}}, ...]}

Settings are nncodec.nn's defaults (`nncodec.nn.nncargs`) with only `qp`, `nonweight_qp` (and, if
given, `qp_density`; `use_dq` off with --no-dq) overridden:
  - approx_method "uniform" (scalar quantization), use_dq=True (dependent / trellis-coded
    quantization with two interleaved quantizers and a 4- or 8-state machine), param_opt=True
    (per-tensor choice of DeepCABAC's binarization parameters), row_skipping=True (all-zero rows
    signalled by a flag), qp_density=2 (step = 2^(qp/4) up to NNC's piecewise-linear mantissa
    between powers of two), nonweight_qp=-75 for 1-D tensors, cabac_unary_length_minus1=10,
    lambda_scale=0, no sparsification, no BNF/LSA, no temporal context adaptation.
  - Tensors with ndim > 1 are "weight" (coded at qp); everything else is "unspecified" (coded at
    nonweight_qp). This is nncodec.nnc_core.nnr_model.NNRModel's rule for a plain dict.
  - A dict input makes nn.encode take its "incremental" branch, i.e. nnc.compress() on the
    arrays directly: the bitstream has an NNR_STR unit, an NNR_MPS, an NNR_TPL unit that lists
    the tensor names (topology_storage_format NNR_TPL_UNREC: no graph), and one NNR_NDU per tensor.
The encode time covers nn.encode (quantization incl. the DQ trellis, DeepCABAC, writing the
bitstream file it always writes); the decode time covers nn.decode (DeepCABAC decoding and
reconstruction to float32).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import numpy as np


def unit_sizes(bitstream: bytes) -> dict:
    """Bytes per NNR unit type, read from each unit's nnr_unit_size and nnr_unit_type fields.

    Without blocks (no block_id_and_param_type) NNCodec writes one NDU per tensor in input order.
    """
    names = {0: "start", 1: "mps", 2: "lps", 3: "tpl", 4: "qnt", 5: "ndu", 6: "agg"}
    sizes: dict = {"ndu_count": 0, "ndu_sizes": []}
    pos = 0
    while pos < len(bitstream):
        first = bitstream[pos]
        if first & 0x80:  # nnr_unit_size_flag = 1: 31-bit size
            size = int.from_bytes(bitstream[pos : pos + 4], "big") & 0x7FFFFFFF
            header = pos + 4
        else:  # 15-bit size
            size = int.from_bytes(bitstream[pos : pos + 2], "big") & 0x7FFF
            header = pos + 2
        if size <= 0:
            break
        kind = names.get(bitstream[header] >> 2, "other")
        sizes[kind] = sizes.get(kind, 0) + size
        if kind == "ndu":
            sizes["ndu_count"] += 1
            sizes["ndu_sizes"].append(size)
        pos += size
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help=".npz of named float32 arrays")
    parser.add_argument("out_dir", help="where rec_qp{QP}.npz and bitstream_qp{QP}.nnc go")
    parser.add_argument("--qp", type=int, nargs="+", required=True, help="weight QP(s); one bitstream each")
    parser.add_argument("--nonweight-qp", type=int, default=None, help="QP of 1-D tensors (NNCodec default -75)")
    parser.add_argument("--qp-density", type=int, default=None, help="NNC qp_density (NNCodec default 2)")
    parser.add_argument("--no-dq", action="store_true", help="scalar quantization without dependent quantization")
    args = parser.parse_args(argv)

    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        import importlib.metadata

        from nncodec import nn as nncodec_nn

        with np.load(args.input) as data:
            params = {name: np.ascontiguousarray(data[name], dtype=np.float32) for name in data.files}
        os.makedirs(args.out_dir, exist_ok=True)
        settings = dict(nncodec_nn.nncargs)
        settings["verbose"] = False
        if args.nonweight_qp is not None:
            settings["nonweight_qp"] = args.nonweight_qp
        if args.qp_density is not None:
            settings["qp_density"] = args.qp_density
        if args.no_dq:
            settings["use_dq"] = False
        results = []
        with tempfile.TemporaryDirectory() as scratch:
            settings["results"] = scratch  # nn.encode always writes the bitstream to a file here
            for qp in args.qp:
                settings["qp"] = qp
                # nn.encode may modify the dict's arrays in place (scalars are reshaped), so give it copies.
                started = time.perf_counter()
                bitstream = bytes(nncodec_nn.encode({k: v.copy() for k, v in params.items()}, args=dict(settings)))
                encode_s = time.perf_counter() - started
                started = time.perf_counter()
                rec = nncodec_nn.decode(bytearray(bitstream), args=dict(settings))
                decode_s = time.perf_counter() - started
                missing = set(params) - set(rec)
                if missing:
                    raise SystemExit(f"NNCodec did not return tensors {sorted(missing)[:5]}")
                rec = {k: np.asarray(rec[k], dtype=np.float32).reshape(params[k].shape) for k in params}
                out = os.path.join(args.out_dir, f"rec_qp{qp}.npz")
                np.savez(out, **rec)
                with open(os.path.join(args.out_dir, f"bitstream_qp{qp}.nnc"), "wb") as handle:
                    handle.write(bitstream)
                results.append(
                    {
                        "qp": qp,
                        "bytes": len(bitstream),
                        "encode_s": encode_s,
                        "decode_s": decode_s,
                        "output": out,
                        "units": unit_sizes(bitstream),
                    }
                )
        report = {
            "nncodec_version": importlib.metadata.version("nncodec"),
            "numpy_version": np.__version__,
            "settings": {k: v for k, v in settings.items() if k not in ("results", "qp")},
            "results": results,
        }
    json.dump(report, real_stdout)
    real_stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
