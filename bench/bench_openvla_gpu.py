#!/usr/bin/env python3
"""OpenVLA-7B-sized inference on a GPU: actions/s, latency p50/p99, peak memory.

No weights can be downloaded on the GPU hosts, so the model is a stand-in of
OpenVLA's architecture at its real size with random weights, built from
configs with transformers' own model classes:

- vision: Prismatic's fused backbone, DINOv2 ViT-L/14 and SigLIP so400m/14 at
  224 px, each giving 256 patch features from its second-to-last layer,
  concatenated to 2176 channels (~730M parameters);
- projector: Prismatic's fused-GELU MLP 2176 -> 8704 -> 4096 -> 4096;
- language model: Llama-2-7B shape (4096 hidden, 32 layers, 32 heads,
  11008 MLP, 32064 vocabulary as OpenVLA pads it), LlamaForCausalLM.

One measured step is what ``predict_action`` does for one observation:
the 6x224x224 pixel tensor goes host -> GPU, both vision towers and the
projector run, the image features are inserted after BOS into the prompt
embeddings (~24 prompt tokens), the LM prefills that sequence and greedily
decodes 7 action tokens with its KV cache, and the tokens are turned back
into bin centres. Tokenisation and image resizing are not timed. Each
attention implementation the LM supports on this machine is one row.

Where there is no CUDA GPU it prints why and exits 0. ``--tiny`` runs the
same harness with a tiny config on the CPU (used by the tests).

    .ci/ros_env.sh python bench/bench_openvla_gpu.py            # on a GPU host
    .ci/ros_env.sh python bench/bench_openvla_gpu.py --tiny     # harness check
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

ACTION_DIM = 7
N_ACTION_BINS = 256
ATTN_ORDER = ("flash_attention_2", "sdpa", "eager")


@dataclass(frozen=True)
class ArchSpec:
    """Sizes of the stand-in model."""

    image_size: int
    patch_size: int
    dino: dict
    siglip: dict
    llm: dict
    prompt_tokens: int


OPENVLA_7B = ArchSpec(
    image_size=224,
    patch_size=14,
    dino={"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "mlp_ratio": 4},
    siglip={
        "hidden_size": 1152,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "intermediate_size": 4304,
    },
    llm={
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "intermediate_size": 11008,
        "vocab_size": 32064,
        "max_position_embeddings": 2048,
    },
    prompt_tokens=24,
)

TINY = ArchSpec(
    image_size=28,
    patch_size=14,
    dino={"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "mlp_ratio": 2},
    siglip={
        "hidden_size": 48,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "intermediate_size": 96,
    },
    llm={
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 128,
        "vocab_size": 512,
        "max_position_embeddings": 256,
    },
    prompt_tokens=24,
)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def decode_action_tokens(token_ids: Sequence[int], vocab_size: int) -> list[float]:
    """OpenVLA's de-tokenisation: the last 255 vocabulary ids are bins in [-1, 1]."""
    width = 2.0 / (N_ACTION_BINS - 1)
    centres = [-1.0 + width * (i + 0.5) for i in range(N_ACTION_BINS - 1)]
    out = []
    for token in token_ids:
        index = min(max(vocab_size - int(token) - 1, 0), len(centres) - 1)
        out.append(centres[index])
    return out


def _dtype_kwargs(dtype: Any) -> dict:
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) >= Version("4.56"):
        return {"dtype": dtype}
    return {"torch_dtype": dtype}


def attn_candidates(requested: str, on_cuda: bool) -> list[str]:
    if requested != "auto":
        return [name.strip() for name in requested.split(",") if name.strip()]
    names = ["sdpa", "eager"]
    if on_cuda and importlib.util.find_spec("flash_attn") is not None:
        names.insert(0, "flash_attention_2")
    return names


class StandInOpenVLA:
    """The stand-in model: vision towers + projector built once, one LM per attention."""

    def __init__(self, spec: ArchSpec, device: Any, dtype: Any):
        import torch
        from transformers import Dinov2Config, Dinov2Model, SiglipVisionConfig, SiglipVisionModel

        self.spec, self.device, self.dtype = spec, device, dtype
        common = {"image_size": spec.image_size, "patch_size": spec.patch_size}
        with torch.device(device):
            self.dino = Dinov2Model(Dinov2Config(**common, **spec.dino)).to(dtype).eval()
            self.siglip = (
                SiglipVisionModel(SiglipVisionConfig(**common, **spec.siglip)).to(dtype).eval()
            )
            vision_dim = spec.dino["hidden_size"] + spec.siglip["hidden_size"]
            llm_dim = spec.llm["hidden_size"]
            self.projector = torch.nn.Sequential(
                torch.nn.Linear(vision_dim, 4 * vision_dim),
                torch.nn.GELU(),
                torch.nn.Linear(4 * vision_dim, llm_dim),
                torch.nn.GELU(),
                torch.nn.Linear(llm_dim, llm_dim),
            ).to(dtype)
        self.llm: Optional[Any] = None
        self.attn: Optional[str] = None

    def load_llm(self, attn: str) -> None:
        """(Re)build the language model with ``attn``; raises if this machine lacks it."""
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig

        self.llm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        config = LlamaConfig(**self.spec.llm)
        # Built straight on the target device in the target dtype: no 28 GB fp32 copy in RAM.
        with torch.device(self.device):
            llm = AutoModelForCausalLM.from_config(
                config, attn_implementation=attn, **_dtype_kwargs(self.dtype)
            )
        self.llm, self.attn = llm.to(self.device, self.dtype).eval(), attn

    def parameter_counts(self) -> dict[str, int]:
        def count(module: Any) -> int:
            return sum(p.numel() for p in module.parameters())

        counts = {
            "vision": count(self.dino) + count(self.siglip),
            "projector": count(self.projector),
        }
        if self.llm is not None:
            counts["llm"] = count(self.llm)
        return counts

    def predict_action_tokens(self, pixel_values_cpu: Any, prompt_ids: Any) -> list[int]:
        """What OpenVLA's predict_action computes for one observation (greedy)."""
        import torch

        with torch.inference_mode():
            pixels = pixel_values_cpu.to(self.device, self.dtype, non_blocking=False)
            dino_pixels, siglip_pixels = torch.split(pixels, [3, 3], dim=1)
            dino = self.dino(pixel_values=dino_pixels, output_hidden_states=True)
            siglip = self.siglip(pixel_values=siglip_pixels, output_hidden_states=True)
            # Second-to-last layer patches; DINOv2 also carries a CLS token first.
            features = torch.cat([dino.hidden_states[-2][:, 1:], siglip.hidden_states[-2]], dim=2)
            image_embeddings = self.projector(features)
            ids = prompt_ids.to(self.device)
            text = self.llm.get_input_embeddings()(ids)
            embeddings = torch.cat([text[:, :1], image_embeddings, text[:, 1:]], dim=1)
            out = self.llm(inputs_embeds=embeddings, use_cache=True)
            tokens = []
            for step in range(ACTION_DIM):
                next_token = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(next_token)
                if step + 1 < ACTION_DIM:
                    out = self.llm(
                        input_ids=next_token, past_key_values=out.past_key_values, use_cache=True
                    )
            return torch.cat(tokens, dim=1)[0].tolist()


@dataclass(frozen=True)
class Row:
    attn: str
    latencies_ms: list[float]
    peak_gib: Optional[float]

    @property
    def p50(self) -> float:
        return percentile(self.latencies_ms, 50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies_ms, 99)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.latencies_ms)


def measure(model: StandInOpenVLA, iterations: int, warmup: int, seed: int = 0) -> Row:
    import torch

    on_cuda = str(model.device).startswith("cuda")
    generator = torch.Generator().manual_seed(seed)
    spec = model.spec
    prompt = torch.randint(
        1, spec.llm["vocab_size"] - N_ACTION_BINS, (1, spec.prompt_tokens), generator=generator
    )
    prompt[0, 0] = 1  # BOS
    frames = [
        torch.randn(1, 6, spec.image_size, spec.image_size, generator=generator) for _ in range(4)
    ]
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    latencies = []
    for i in range(warmup + iterations):
        start = time.perf_counter()
        tokens = model.predict_action_tokens(frames[i % len(frames)], prompt)
        decode_action_tokens(tokens, spec.llm["vocab_size"])
        if on_cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            latencies.append((time.perf_counter() - start) * 1000.0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_cuda else None
    return Row(model.attn or "?", latencies, peak)


def format_table(rows: Sequence[Row]) -> str:
    header = (
        f"{'attn (LM)':<18} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9} "
        f"{'actions/s':>10} {'peak GiB':>9} {'p50 vs first':>13}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        peak = f"{row.peak_gib:9.2f}" if row.peak_gib is not None else f"{'-':>9}"
        lines.append(
            f"{row.attn:<18} {row.p50:9.2f} {row.p99:9.2f} {row.mean:9.2f} "
            f"{1000.0 / row.mean:10.2f} {peak} {row.p50 / rows[0].p50:12.2f}x"
        )
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config on the CPU")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--attn",
        default="auto",
        help="comma-separated LM attention implementations, or auto (all this machine has)",
    )
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16"))
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.warmup < 0:
        parser.error("--iterations must be >= 1 and --warmup >= 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    import torch
    import transformers

    on_cuda = torch.cuda.is_available()
    if not args.tiny and not on_cuda:
        print(
            "bench_openvla_gpu: no CUDA GPU on this machine; skipped "
            "(run it on a GPU host, or with --tiny to check the harness on the CPU)"
        )
        return 0

    spec = TINY if args.tiny else OPENVLA_7B
    device = torch.device("cpu") if args.tiny else torch.device("cuda")
    if args.tiny:
        dtype = torch.float32
    elif args.dtype == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = getattr(torch, args.dtype)
    device_name = torch.cuda.get_device_name(device) if on_cuda and not args.tiny else "cpu"

    torch.manual_seed(0)
    model = StandInOpenVLA(spec, device, dtype)
    rows, skipped = [], []
    for attn in attn_candidates(args.attn, device.type == "cuda"):
        try:
            model.load_llm(attn)
        except (ValueError, ImportError) as exc:
            skipped.append(f"{attn} ({str(exc).splitlines()[0][:120]})")
            continue
        rows.append(measure(model, args.iterations, args.warmup))
    counts = model.parameter_counts()

    title = "tiny harness check" if args.tiny else "OpenVLA-7B-sized stand-in, random weights"
    print(f"OpenVLA GPU benchmark: {title}")
    print(
        f"device: {device_name} | torch {torch.__version__} | transformers "
        f"{transformers.__version__} | dtype {str(dtype).replace('torch.', '')}"
    )
    print(
        "parameters: "
        + ", ".join(f"{name} {n / 1e6:.1f}M" for name, n in counts.items())
        + f", total {sum(counts.values()) / 1e6:.1f}M"
    )
    print(
        f"{args.iterations} timed observations after {args.warmup} warm-up | "
        f"{spec.prompt_tokens} prompt tokens + {(spec.image_size // spec.patch_size) ** 2} "
        f"image patches | {ACTION_DIM} action tokens per observation (one action)"
    )
    if skipped:
        print("skipped: " + "; ".join(skipped))
    if not rows:
        print("no attention implementation could be built; nothing measured")
        return 1
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
