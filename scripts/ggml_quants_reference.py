#!/usr/bin/env python3
"""Reference dequantizations of ggml block types for tests/ggml_quants.rs, from gguf-py (the
`gguf` package: llama.cpp's own Python reader, an implementation in numpy that shares no code
with recforge's `model::gguf::dequantize`).

For each type, a few blocks of seeded random bytes, with the f16 scale fields set to finite
values in [-2, 2] (random bytes there could be inf or NaN), and what gguf-py dequantizes them
to. Both go into the JSON (bytes as hex); the JSON is written to a temporary name and renamed.

  python3 scripts/ggml_quants_reference.py --out tests/data/ggml_quants.json

Needs numpy and gguf (tried with gguf 0.19.0).
"""
import argparse
import json
import os
import sys

# ggml type id -> (name, blocks, byte offsets of the f16 scale fields in a block)
TYPES = {
    2: ("Q4_0", 8, [0]),
    3: ("Q4_1", 8, [0, 2]),
    6: ("Q5_0", 8, [0]),
    7: ("Q5_1", 8, [0, 2]),
    8: ("Q8_0", 8, [0]),
    10: ("Q2_K", 3, [80, 82]),
    11: ("Q3_K", 3, [108]),
    12: ("Q4_K", 3, [0, 2]),
    13: ("Q5_K", 3, [0, 2]),
    14: ("Q6_K", 3, [208]),
}


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args(argv)
    import numpy as np
    import gguf
    from gguf import quants

    rng = np.random.default_rng(a.seed)
    cases = []
    for type_id, (name, blocks, f16_at) in TYPES.items():
        qt = gguf.GGMLQuantizationType(type_id)
        block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qt]
        raw = rng.integers(0, 256, size=(blocks, block_bytes), dtype=np.uint8)
        for off in f16_at:
            scale = rng.uniform(-2.0, 2.0, size=blocks).astype(np.float16)
            raw[:, off:off + 2] = scale.view(np.uint8).reshape(blocks, 2)
        values = quants.dequantize(raw.reshape(-1), qt).astype(np.float32).reshape(-1)
        assert values.size == blocks * block_elems and np.isfinite(values).all(), name
        cases.append({"type": type_id, "name": name, "block_elements": block_elems,
                      "block_bytes": block_bytes, "bytes": raw.tobytes().hex(),
                      "values": [float(v) for v in values]})
    res = {"generated_by": "scripts/ggml_quants_reference.py", "seed": a.seed,
           "gguf": getattr(gguf, "__version__", None) or _version("gguf"),
           "numpy": np.__version__, "cases": cases}
    d = os.path.dirname(os.path.abspath(a.out))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(a.out)}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(res, f, separators=(",", ":"))
        f.write("\n")
    os.replace(tmp, a.out)
    print(f"{len(cases)} types: " + ", ".join(f"{c['name']} ({len(c['values'])} values)" for c in cases))
    return 0


def _version(pkg):
    from importlib.metadata import version
    return version(pkg)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
