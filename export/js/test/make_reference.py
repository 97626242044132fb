"""Write numpy_reference.json: what numpy and hnet_core produce, for the Node tests to match.

    python export/js/test/make_reference.py     (from the repository root)

The Node tests (node --test export/js/test/) then run without Python.
"""

import json
import os

import numpy as np

from hnet_core.sampling import Sampler, SamplingParams
from hnet_core.streaming import TextStream

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    rng_cases = []
    for seed in (0, 1, 42, 2**40 + 7, 2**70 + 3):
        g = np.random.default_rng(seed)
        rng_cases.append({"seed": str(seed), "state": str(g.bit_generator.state["state"]["state"]),
                          "random": [g.random() for _ in range(5)]})
    logits = [float(np.float32(np.sin(i * 0.37) * 3 + (i % 7) * 0.2)) for i in range(256)]
    history = [1, 2, 3, 40, 41, 200, 201]
    sampling_cases = []
    for params in [dict(temperature=1.0, seed=0), dict(temperature=0.7, top_k=20, seed=1),
                   dict(temperature=1.3, top_p=0.8, seed=2), dict(temperature=1.0, min_p=0.1, seed=3),
                   dict(temperature=0.9, repetition_penalty=1.3, top_k=50, top_p=0.95, min_p=0.02, seed=12345678901),
                   dict(temperature=0, repetition_penalty=1.5)]:
        sampler = Sampler(SamplingParams(**params))
        picks = [int(sampler(np.array([logits]), [history])[0]) for _ in range(40)]
        sampling_cases.append({"params": params, "picks": picks})
    rng = np.random.default_rng(7)
    sums = []
    for n in (1, 7, 8, 9, 100, 128, 129, 256, 300):
        a = rng.random(n) ** 8
        sums.append({"values": a.tolist(), "sum": float(a.sum())})
    stream_cases = []
    tricky = [b"\xe2\x82A", b"\xed\xa0\x80x", b"\xc0\x80", b"\xf4\x90\x80\x80", b"\xef\xbb\xbfhi", b"\xf0\x9f\x8e",
              b"caf\xc3", "naïve ☃ 日本 🎉".encode(), b"\xff\xfe\x80abc", b"ab\xf0\x9f\x98end"]
    for data in tricky + [bytes(rng.integers(0, 256, 40).astype(np.uint8)) for _ in range(12)]:
        for stop in ([], ["nd"], ["\u2603", "ab"]):
            stream = TextStream(stop)
            text = "".join(stream.feed(b) for b in data)
            text += stream.finish() if not stream.done else ""
            stream_cases.append({"bytes": list(data), "stop": stop, "text": text})
    out = {"logits": logits, "history": history, "rng": rng_cases, "sampling": sampling_cases, "sums": sums,
           "streams": stream_cases}
    with open(os.path.join(HERE, "numpy_reference.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
