#!/usr/bin/env python3
"""Build an OpenVLA checkpoint directory with random weights from the authors' own remote code.

No OpenVLA weights can be downloaded on the GPU hosts (and none are needed to
check loading, attention paths and speed), so this writes what the Hub's
``openvla/openvla-7b`` holds, with random weights:

- ``configuration_prismatic.py``, ``modeling_prismatic.py``,
  ``processing_prismatic.py`` copied from ``--hf-dir`` (``prismatic/extern/hf``
  of github.com/openvla/openvla; never part of this repository; default
  ``$OPENVLA_HF_DIR``, else the project's shared copy ``../shared/openvla-hf``
  beside the checkout where there is one), and
  ``config.json`` whose ``auto_map`` points at them;
- the model saved by ``save_pretrained`` (safetensors) after being built by
  that remote class, so ``from_pretrained(..., trust_remote_code=True)`` takes
  exactly the code path of the real checkpoint;
- the processor (``PrismaticImageProcessor`` + ``PrismaticProcessor``) and a
  Llama-2-shaped tokenizer made here with ``tokenizers``: 32000 ids with
  ``"\u2581"`` at 29871 (the id ``predict_action`` appends) and ``<PAD>`` at
  32000, the text vocabulary padded to 32064 as OpenVLA pads it.

``--size real`` is OpenVLA-7B: DINOv2 ViT-L + SigLIP so400m at 224 px,
Llama-2-7B (~7.5B parameters, ~15 GB in bf16; build it on the GPU).
``--size tiny`` keeps every code path but shrinks the parts: one ViT-Tiny
tower at 64 px (16 patches) and a 2-layer 64-wide Llama (~8M parameters), so
it builds in seconds on a CPU.

Random weights almost never pick one of the 256 action tokens out of 32064
when decoding greedily; a trained OpenVLA only ever emits action tokens. So the
LM-head rows of the action tokens get ``--action-head-gain`` (default 4).

    python bench/openvla_checkpoint.py --hf-dir $OPENVLA_HF_DIR --out CKPT     # 7B, cuda, bf16
    python bench/openvla_checkpoint.py --hf-dir $OPENVLA_HF_DIR --out T --size tiny --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

REMOTE_FILES = ("configuration_prismatic.py", "modeling_prismatic.py", "processing_prismatic.py")
# The project's shared copy of that remote code, beside the checkout (development machines, CI).
SHARED_HF_DIR = Path(__file__).resolve().parents[2] / "shared" / "openvla-hf"
BASE_VOCAB = 32000  # Llama-2
PAD_TO_MULTIPLE_OF = 64
PAD_TOKEN = "<PAD>"
PROMPT_END_TOKEN = "\u2581"
PROMPT_END_TOKEN_ID = 29871  # hard-coded in OpenVLA's predict_action
N_ACTION_BINS = 256

# Bridge-like statistics (rounded); un-normalisation needs q01/q99/mask, the rest is for shape.
_Q = {
    "bridge_orig": (
        [-0.029, -0.042, -0.026, -0.081, -0.092, -0.130, 0.0],
        [0.028, 0.041, 0.040, 0.082, 0.079, 0.139, 1.0],
    ),
    "fractal20220817_data": (
        [-0.222, -0.149, -0.232, -0.352, -0.420, -0.436, 0.0],
        [0.177, 0.145, 0.220, 0.587, 0.352, 0.448, 1.0],
    ),
}


def norm_stats() -> dict:
    stats = {}
    for key, (q01, q99) in _Q.items():
        action = {
            "q01": q01,
            "q99": q99,
            "mean": [(a + b) / 2 for a, b in zip(q01, q99, strict=True)],
            "std": [(b - a) / 4 for a, b in zip(q01, q99, strict=True)],
            "min": [3 * a for a in q01],
            "max": [3 * b for b in q99],
            "mask": [True] * 6 + [False],
        }
        stats[key] = {"action": action, "num_trajectories": 1000, "num_transitions": 50000}
    return stats


def config_json(size: str) -> dict:
    """config.json as the Hub has it; the tiny size overrides the towers the config derives."""
    text_config: dict[str, Any] = {
        "model_type": "llama",
        "vocab_size": BASE_VOCAB + PAD_TO_MULTIPLE_OF,
        "pad_token_id": BASE_VOCAB,
        "torch_dtype": "bfloat16",
    }
    config: dict[str, Any] = {
        "model_type": "openvla",
        "architectures": ["OpenVLAForActionPrediction"],
        "auto_map": {
            "AutoConfig": "configuration_prismatic.OpenVLAConfig",
            "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction",
        },
        "vision_backbone_id": "dinosiglip-vit-so-224px",
        "llm_backbone_id": "llama2-7b-pure",
        "arch_specifier": "no-align+fused-gelu-mlp",
        "use_fused_vision_backbone": True,
        "image_resize_strategy": "resize-naive",
        "llm_max_length": 2048,
        "pad_token_id": BASE_VOCAB,
        "pad_to_multiple_of": PAD_TO_MULTIPLE_OF,
        "n_action_bins": N_ACTION_BINS,
        "norm_stats": norm_stats(),
        "output_projector_states": False,
        "torch_dtype": "bfloat16",
        "text_config": text_config,
    }
    if size == "tiny":
        text_config.update(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
        )
        # PrismaticConfig derives these from vision_backbone_id; keys in config.json win
        # because PretrainedConfig sets the remaining kwargs last.
        config.update(
            vision_backbone_id="siglip-vit-so400m",
            arch_specifier="no-align+gelu-mlp",
            use_fused_vision_backbone=False,
            timm_model_ids=["vit_tiny_patch16_224"],
            timm_override_act_layers=[None],
            image_sizes=[64],
        )
    return config


def image_processor_options(size: str) -> dict:
    if size == "tiny":
        return {
            "use_fused_vision_backbone": False,
            "image_resize_strategy": "resize-naive",
            "input_sizes": [(3, 64, 64)],
            "interpolations": ["bicubic"],
            "means": [(0.5, 0.5, 0.5)],
            "stds": [(0.5, 0.5, 0.5)],
        }
    # timm's data configs of the two towers of dinosiglip-vit-so-224px.
    return {
        "use_fused_vision_backbone": True,
        "image_resize_strategy": "resize-naive",
        "input_sizes": [(3, 224, 224), (3, 224, 224)],
        "interpolations": ["bicubic", "bicubic"],
        "means": [(0.485, 0.456, 0.406), (0.5, 0.5, 0.5)],
        "stds": [(0.229, 0.224, 0.225), (0.5, 0.5, 0.5)],
    }


def llama_shaped_tokenizer() -> Any:
    """A word-level tokenizer laid out like Llama-2's 32000 ids (the ids are what matters)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = (
        "In : What action should the robot take to ? Out pick up place put push pull open "
        "close move lift grasp drop the a an object cup mug block ball bottle drawer door lid "
        "box bowl plate red green blue yellow left right top on into from of and table"
    ).split()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in dict.fromkeys(words):
        vocab.setdefault(PROMPT_END_TOKEN + word, len(vocab))
        vocab.setdefault(word, len(vocab))
    filler = 0
    while len(vocab) < BASE_VOCAB:
        if len(vocab) == PROMPT_END_TOKEN_ID:
            vocab[PROMPT_END_TOKEN] = PROMPT_END_TOKEN_ID
        else:
            vocab[f"<filler_{filler}>"] = len(vocab)
            filler += 1
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    return tokenizer


def _patch_json(path: Path, **fields: Any) -> None:
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data, indent=2) + "\n")


def default_hf_dir() -> Optional[str]:
    """``$OPENVLA_HF_DIR``, else the shared copy beside the checkout where it exists."""
    if os.environ.get("OPENVLA_HF_DIR"):
        return os.environ["OPENVLA_HF_DIR"]
    return str(SHARED_HF_DIR) if SHARED_HF_DIR.is_dir() else None


def build_checkpoint(
    out: Path,
    hf_dir: Path,
    *,
    size: str = "real",
    device: str = "cuda",
    dtype: str = "bfloat16",
    seed: int = 0,
    action_head_gain: float = 4.0,
    log: Any = print,
) -> Path:
    """Write the checkpoint into ``out`` (replaced if present) and return it."""
    import torch
    import transformers
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    hf_dir, out = Path(hf_dir), Path(out)
    missing = [name for name in REMOTE_FILES if not (hf_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{hf_dir} lacks {', '.join(missing)}: point --hf-dir / OPENVLA_HF_DIR at "
            "prismatic/extern/hf of a github.com/openvla/openvla checkout"
        )
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in REMOTE_FILES:
        shutil.copyfile(hf_dir / name, out / name)
    config = config_json(size)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    tokenizer = transformers.LlamaTokenizerFast(
        tokenizer_object=llama_shaped_tokenizer(),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
        legacy=False,
        padding_side="right",
        model_max_length=2048,
    )
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if tokenizer.pad_token_id != BASE_VOCAB:
        raise RuntimeError(f"<PAD> got id {tokenizer.pad_token_id}, expected {BASE_VOCAB}")
    image_processor_class = get_class_from_dynamic_module(
        "processing_prismatic.PrismaticImageProcessor", str(out)
    )
    processor_class = get_class_from_dynamic_module(
        "processing_prismatic.PrismaticProcessor", str(out)
    )
    processor = processor_class(
        image_processor=image_processor_class(**image_processor_options(size)), tokenizer=tokenizer
    )
    processor.save_pretrained(str(out))
    auto_processor = {"AutoProcessor": "processing_prismatic.PrismaticProcessor"}
    _patch_json(
        out / "preprocessor_config.json",
        image_processor_type="PrismaticImageProcessor",
        processor_class="PrismaticProcessor",
        auto_map={
            "AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor",
            **auto_processor,
        },
    )
    _patch_json(
        out / "tokenizer_config.json",
        tokenizer_class="LlamaTokenizer",
        processor_class="PrismaticProcessor",
        auto_map=auto_processor,
    )
    (out / "processor_config.json").write_text(
        json.dumps({"processor_class": "PrismaticProcessor", "auto_map": auto_processor}) + "\n"
    )

    config_class = get_class_from_dynamic_module("configuration_prismatic.OpenVLAConfig", str(out))
    model_class = get_class_from_dynamic_module(
        "modeling_prismatic.OpenVLAForActionPrediction", str(out)
    )
    model_config = config_class.from_pretrained(str(out))
    # transformers 4.50+ cannot ask this remote class about sdpa before its LM exists.
    model_config._attn_implementation = "eager"
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(seed)
    started = time.perf_counter()
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(device):
            model = model_class(model_config)
    finally:
        torch.set_default_dtype(default_dtype)
    model = model.to(torch_dtype).eval()
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[BASE_VOCAB - N_ACTION_BINS : BASE_VOCAB] *= action_head_gain
    count = sum(p.numel() for p in model.parameters())
    log(
        f"built {type(model).__name__} ({count / 1e6:.1f}M parameters) on {device} in "
        f"{dtype} in {time.perf_counter() - started:.1f} s"
    )
    started = time.perf_counter()
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size="5GB")
    del model
    # save_pretrained rewrites config.json from the class: restore the Hub's auto_map.
    _patch_json(
        out / "config.json", auto_map=config["auto_map"], architectures=config["architectures"]
    )
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    log(f"saved {out} ({total / 2**30:.2f} GiB) in {time.perf_counter() - started:.1f} s")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="checkpoint directory to write (replaced)")
    parser.add_argument(
        "--hf-dir",
        default=default_hf_dir(),
        help="OpenVLA's prismatic/extern/hf (default: $OPENVLA_HF_DIR, else ../shared/openvla-hf)",
    )
    parser.add_argument("--size", choices=("real", "tiny"), default="real")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--action-head-gain", type=float, default=4.0)
    args = parser.parse_args(argv)
    if not args.hf_dir:
        parser.error("set --hf-dir or OPENVLA_HF_DIR to OpenVLA's prismatic/extern/hf")
    try:
        build_checkpoint(
            Path(args.out),
            Path(args.hf_dir),
            size=args.size,
            device=args.device,
            dtype=args.dtype,
            seed=args.seed,
            action_head_gain=args.action_head_gain,
        )
    except FileNotFoundError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
