#!/usr/bin/env python3
"""Are OpenVLA's batched answers those of each observation alone? Checked on many inputs.

    python bench/check_batched_openvla.py --model CKPT [--unnorm-key K] [--dtype bfloat16]
        [--observations 64] [--batch 8] [--attn-implementation sdpa]

Loads the openvla backend (its start-up check included), then for
--observations random camera frames with instructions of several token
lengths predicts each alone (``predict_raw``: OpenVLA's ``predict_action``)
and in batches of --batch through ``predict_batch``'s path, and prints how
many un-normalised actions are equal, bit for bit, and the time of both. On a
GPU in bf16 batched matrix products may round differently than single ones;
this says whether that ever changes an action on this model and machine.
Exits 1 if any action differs.

``CKPT`` is any OpenVLA checkpoint directory (e.g. one written by
bench/openvla_checkpoint.py, with the authors' remote code and random weights).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

INSTRUCTIONS = (
    "pick up the red cup",
    "open the drawer",
    "put the spoon on the towel",
    "close the drawer",
    "move the blue block to the left of the plate",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--unnorm-key", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--attn-implementation", default="auto")
    parser.add_argument("--observations", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)

    import torch
    import transformers

    from manipulation_policy.backends.openvla import OpenVLABackend
    from manipulation_policy.core.policy_types import Observation

    backend = OpenVLABackend(
        model=args.model, unnorm_key=args.unnorm_key, dtype=args.dtype, device=args.device,
        attn_implementation=args.attn_implementation, check_image_sensitivity=False,
    )  # fmt: skip
    info = backend.describe()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, "
          f"device {info['device']}, dtype {info['dtype']}, attn {info['attn_implementation']}")
    print(f"start-up check: batched decoding {'on' if backend.batches_observations else 'OFF'}"
          f" ({backend.batched_decoding_problem or 'batched == single on the probes'})")

    rng = np.random.default_rng(0)
    observations = [
        Observation(image=rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
                    instruction=INSTRUCTIONS[i % len(INSTRUCTIONS)])
        for i in range(args.observations)
    ]  # fmt: skip
    started = time.perf_counter()
    alone = [backend.predict_raw(o) for o in observations]
    single_s = time.perf_counter() - started
    inputs = [backend._model_input(o) for o in observations]  # the image and prompt predict uses
    started = time.perf_counter()
    together: list[np.ndarray] = []
    for start in range(0, len(inputs), args.batch):
        together.extend(backend._predict_raw_batch(inputs[start : start + args.batch]))
    batched_s = time.perf_counter() - started
    equal = sum(bool(np.array_equal(a, b)) for a, b in zip(alone, together, strict=True))
    distinct = len({tuple(a) for a in alone})
    print(f"{equal}/{len(alone)} batched actions equal to alone ({distinct} distinct actions); "
          f"alone {single_s:.2f} s, batches of {args.batch} {batched_s:.2f} s")  # fmt: skip
    return 0 if equal == len(alone) else 1


if __name__ == "__main__":
    sys.exit(main())
