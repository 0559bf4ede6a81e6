"""A tiny checkpoint with OpenVLA's interface, built offline for tests.

The directory looks like an OpenVLA checkpoint on the Hub: ``config.json``
whose ``auto_map`` points at remote code in the same directory
(``configuration_tiny_openvla.py``, ``modeling_tiny_openvla.py``,
``processing_tiny_openvla.py``), safetensors weights written by
``save_pretrained``, a tokenizer (``tokenizer.json``, made here with the
``tokenizers`` library), an image processor config, and
``dataset_statistics.json``. It loads with ``trust_remote_code=True``
through exactly the code path of a real checkpoint.

What it shares with OpenVLA's ``OpenVLAForActionPrediction`` (the behaviours
the backend depends on, so a backend mistake fails here as on the real model):

- ``predict_action(input_ids, unnorm_key=None, **kwargs)`` appends token 29871
  to ``input_ids`` (not to ``attention_mask``) unless the prompt ends with it,
  then calls ``self.generate(input_ids, max_new_tokens=action_dim, **kwargs)``;
- ``forward`` inserts the image patch embeddings after BOS and widens the
  attention mask to match; eager attention consumes the mask, so a mask one
  short fails with a size mismatch; sdpa drops an all-ones mask (as
  transformers 4.40 does) and fails on a short one that is not all ones;
- greedy decoding over the whole 32064-id vocabulary (Llama-2's 32000 padded
  to a multiple of 64); the action tokens are the last 256 ids below 32000,
  decoded to bin centres in [-1, 1] and un-normalised with q01/q99 where
  ``mask`` is true; the LM-head rows of the action tokens carry a gain (a
  random head never picks them; ``action_head_gain=0`` builds a model that
  never does); ``norm_stats`` keyed by dataset; ``_check_unnorm_key``.

It is ~2M parameters, so a whole test file runs in seconds on a CPU.
``refuse_attn`` lists attention implementations the model refuses at load
time with the AttributeError transformers 4.50-4.57 raise for OpenVLA's sdpa.

``ignores_image=True`` builds a model that drops ``pixel_values`` (what
OpenVLA does under transformers >= 4.50, openvla/openvla#346), so tests can
prove the backend's image-sensitivity check catches it.

Everything heavy (torch, transformers) is imported inside the functions, so
importing this module costs nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

TINY_ACTION_STATS = {
    "q01": [-0.03, -0.03, -0.03, -0.2, -0.2, -0.2, 0.0],
    "q99": [0.03, 0.03, 0.03, 0.2, 0.2, 0.2, 1.0],
    # As in Bridge: the gripper is not normalised.
    "mask": [True, True, True, True, True, True, False],
}
DEFAULT_UNNORM_KEY = "tiny_sim"
VOCAB_SIZE = 32064  # Llama-2's 32000 + <PAD>, padded to a multiple of 64
PAD_TO_MULTIPLE_OF = 64
N_ACTION_BINS = 256
PROMPT_END_TOKEN_ID = 29871
FIRST_ACTION_TOKEN = VOCAB_SIZE - PAD_TO_MULTIPLE_OF - N_ACTION_BINS
IMAGE_SIZE = 32

WORDS = (
    "in : what action should the robot take to ? out pick up place put push pull open close "
    "move lift grasp drop the a an object objects cup mug block cube ball bottle can drawer "
    "door lid box bowl plate red green blue yellow black white left right top bottom on into "
    "onto from of and near table sink towel spoon carrot"
).split()

CONFIGURATION_SOURCE = """\
from transformers import PretrainedConfig


class TinyOpenVLAConfig(PretrainedConfig):
    model_type = "tiny_openvla"

    def __init__(
        self,
        vocab_size=32064,
        hidden_size=32,
        num_heads=2,
        image_size=32,
        patch_size=8,
        max_positions=128,
        n_action_bins=256,
        pad_to_multiple_of=64,
        norm_stats=None,
        ignores_image=False,
        refuse_attn=(),
        initializer_range=0.02,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.image_size = image_size
        self.patch_size = patch_size
        self.max_positions = max_positions
        self.n_action_bins = n_action_bins
        self.pad_to_multiple_of = pad_to_multiple_of
        self.norm_stats = norm_stats
        self.ignores_image = ignores_image
        self.refuse_attn = list(refuse_attn)
        self.initializer_range = initializer_range
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
"""

MODELING_SOURCE = """\
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from .configuration_tiny_openvla import TinyOpenVLAConfig


class TinyOpenVLAForActionPrediction(PreTrainedModel):
    config_class = TinyOpenVLAConfig
    base_model_prefix = "tiny_openvla"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        if config._attn_implementation in config.refuse_attn:
            # What transformers 4.50-4.57 raise for OpenVLA's _supports_sdpa property.
            raise AttributeError(
                f"'{type(self).__name__}' object has no attribute '_supports_sdpa'"
            )
        h = config.hidden_size
        self.patch_embed = nn.Conv2d(3, h, config.patch_size, stride=config.patch_size)
        self.projector = nn.Linear(h, h)
        self.embed_tokens = nn.Embedding(config.vocab_size, h)
        self.embed_positions = nn.Embedding(config.max_positions, h)
        self.attn_norm = nn.LayerNorm(h)
        self.q_proj = nn.Linear(h, h)
        self.k_proj = nn.Linear(h, h)
        self.v_proj = nn.Linear(h, h)
        self.o_proj = nn.Linear(h, h)
        self.mlp_norm = nn.LayerNorm(h)
        self.up_proj = nn.Linear(h, 4 * h)
        self.down_proj = nn.Linear(4 * h, h)
        self.final_norm = nn.LayerNorm(h)
        self.lm_head = nn.Linear(h, config.vocab_size, bias=False)
        self.post_init()

        self.norm_stats = config.norm_stats
        self.bins = np.linspace(-1, 1, config.n_action_bins)
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0
        self.vocab_size = config.vocab_size - config.pad_to_multiple_of

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _attention(self, x, mask):
        batch, length, hidden = x.shape
        heads = self.config.num_heads

        def split(t):
            return t.view(batch, length, heads, hidden // heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        if self.config._attn_implementation == "eager":
            scores = q @ k.transpose(-1, -2) / (hidden // heads) ** 0.5
            allowed = causal[None, None]
            if mask is not None:
                # [B, 1, L, L] & [B, 1, 1, L_mask]: a mask of the wrong length fails here.
                allowed = allowed & mask.bool()[:, None, None, :]
            out = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
        elif mask is None or bool(mask.all()):
            # transformers 4.40 drops an all-ones mask for sdpa and uses is_causal.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            allowed = causal[None, None] & mask.bool()[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, hidden))

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, **kwargs):
        embeddings = self.embed_tokens(input_ids)
        if pixel_values is not None and not self.config.ignores_image:
            pixel_values = pixel_values.to(self.patch_embed.weight.dtype)
            patches = self.projector(self.patch_embed(pixel_values).flatten(2).transpose(1, 2))
            # Prismatic inserts the image after the BOS token, and widens the mask to match.
            embeddings = torch.cat([embeddings[:, :1], patches, embeddings[:, 1:]], dim=1)
            if attention_mask is not None:
                ones = attention_mask.new_ones(attention_mask.shape[0], patches.shape[1])
                attention_mask = torch.cat(
                    [attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1
                )
        positions = torch.arange(embeddings.shape[1], device=embeddings.device)
        x = embeddings + self.embed_positions(positions)[None]
        x = x + self._attention(self.attn_norm(x), attention_mask)
        x = x + self.down_proj(F.gelu(self.up_proj(self.mlp_norm(x))))
        return self.lm_head(self.final_norm(x))

    def generate(self, input_ids, max_new_tokens, attention_mask=None, pixel_values=None,
                 do_sample=False, use_cache=None, **kwargs):
        # Greedy over the whole vocabulary, the mask growing by one per token as in
        # transformers' generate (so a mask that starts short stays short).
        if do_sample:
            raise ValueError("this tiny model only decodes greedily (do_sample=False)")
        ids, mask = input_ids, attention_mask
        for _ in range(max_new_tokens):
            logits = self(ids, attention_mask=mask, pixel_values=pixel_values)[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        return ids

    def predict_action(self, input_ids=None, unnorm_key=None, **kwargs):
        # As OpenVLA: the empty token after "Out:", appended to the ids only.
        if not torch.all(input_ids[:, -1] == 29871):
            column = torch.full((input_ids.shape[0], 1), 29871, dtype=input_ids.dtype)
            input_ids = torch.cat([input_ids, column.to(input_ids.device)], dim=1)
        action_dim = self.get_action_dim(unnorm_key)
        generated = self.generate(input_ids, max_new_tokens=action_dim, **kwargs)

        token_ids = generated[0, -action_dim:].cpu().numpy()
        discretized = np.clip(self.vocab_size - token_ids - 1, 0, self.bin_centers.shape[0] - 1)
        normalized = self.bin_centers[discretized]
        stats = self.get_action_stats(unnorm_key)
        mask = np.asarray(stats.get("mask", np.ones_like(stats["q01"], dtype=bool)), dtype=bool)
        high, low = np.asarray(stats["q99"]), np.asarray(stats["q01"])
        return np.where(mask, 0.5 * (normalized + 1) * (high - low) + low, normalized)

    @staticmethod
    def _check_unnorm_key(norm_stats, unnorm_key):
        if unnorm_key is None:
            assert len(norm_stats) == 1, f"pass an unnorm_key from {list(norm_stats)}"
            unnorm_key = next(iter(norm_stats))
        assert unnorm_key in norm_stats, f"unnorm_key must be one of {list(norm_stats)}"
        return unnorm_key

    def get_action_dim(self, unnorm_key=None):
        unnorm_key = self._check_unnorm_key(self.norm_stats, unnorm_key)
        return len(self.norm_stats[unnorm_key]["action"]["q01"])

    def get_action_stats(self, unnorm_key=None):
        unnorm_key = self._check_unnorm_key(self.norm_stats, unnorm_key)
        return self.norm_stats[unnorm_key]["action"]
"""

PROCESSING_SOURCE = """\
import numpy as np
from PIL import Image
from transformers import BatchFeature
from transformers.image_processing_utils import ImageProcessingMixin
from transformers.processing_utils import ProcessorMixin


class TinyOpenVLAImageProcessor(ImageProcessingMixin):
    model_input_names = ["pixel_values"]

    def __init__(self, image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), **kwargs):
        self.image_size = image_size
        self.mean = list(mean)
        self.std = list(std)
        super().__init__(**kwargs)

    def preprocess(self, images, return_tensors=None, **_):
        if not isinstance(images, list):
            images = [images]
        size = (self.image_size, self.image_size)
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        arrays = []
        for image in images:
            pixels = np.asarray(image.convert("RGB").resize(size, Image.BICUBIC), np.float32)
            arrays.append(((pixels / 255.0 - mean) / std).transpose(2, 0, 1))
        return BatchFeature(data={"pixel_values": np.stack(arrays)}, tensor_type=return_tensors)

    def __call__(self, images, **kwargs):
        return self.preprocess(images, **kwargs)


class TinyOpenVLAProcessor(ProcessorMixin):
    attributes = ["image_processor", "tokenizer"]
    image_processor_class = "AutoImageProcessor"
    tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer)

    def __call__(self, text, images, return_tensors="pt", **_):
        pixel_values = self.image_processor(images, return_tensors=return_tensors)["pixel_values"]
        text_inputs = self.tokenizer(text, return_tensors=return_tensors)
        if pixel_values.shape[0] != text_inputs["input_ids"].shape[0]:
            raise ValueError("expected as many images as texts")
        return BatchFeature(data={**text_inputs, "pixel_values": pixel_values})
"""

REMOTE_FILES = {
    "configuration_tiny_openvla.py": CONFIGURATION_SOURCE,
    "modeling_tiny_openvla.py": MODELING_SOURCE,
    "processing_tiny_openvla.py": PROCESSING_SOURCE,
}
MODEL_CLASS_REF = "modeling_tiny_openvla.TinyOpenVLAForActionPrediction"


def norm_stats_for(*keys: str, scale: float = 1.0) -> dict:
    """OpenVLA's dataset_statistics.json layout, the same stats under each key."""
    action = {
        "q01": [v * scale for v in TINY_ACTION_STATS["q01"][:6]] + [0.0],
        "q99": [v * scale for v in TINY_ACTION_STATS["q99"][:6]] + [1.0],
        "mask": list(TINY_ACTION_STATS["mask"]),
    }
    return {key: {"action": json.loads(json.dumps(action))} for key in keys}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _save_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {token: index for index, token in enumerate(specials + sorted(set(WORDS)))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.save_pretrained(directory)
    # Let AutoProcessor find the remote processor from the tokenizer side too,
    # as OpenVLA's tokenizer_config.json does.
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["processor_class"] = "TinyOpenVLAProcessor"
    config["auto_map"] = {"AutoProcessor": "processing_tiny_openvla.TinyOpenVLAProcessor"}
    _write_json(config_path, config)


def _randomise_weights(model, seed: int, action_head_gain: float) -> None:
    """Weights large enough that the image visibly steers the greedy tokens."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.fill_(1.0 if name.endswith("weight") else 0.0)
            elif parameter.dim() == 1:
                parameter.normal_(0.0, 0.1, generator=generator)
            else:
                # A strong value path makes the image patches steer the last token.
                gain = 3.0 if name.split(".")[0] in ("v_proj", "o_proj") else 1.0
                fan_in = parameter[0].numel()
                parameter.normal_(0.0, gain / fan_in**0.5, generator=generator)
        model.embed_tokens.weight.normal_(0.0, 1.0, generator=generator)
        model.embed_positions.weight.normal_(0.0, 0.3, generator=generator)
        # A random head almost never picks one of 256 action ids out of 32064; a
        # trained OpenVLA only does.
        model.lm_head.weight[FIRST_ACTION_TOKEN : FIRST_ACTION_TOKEN + N_ACTION_BINS] *= (
            action_head_gain
        )


def build_tiny_openvla(
    directory: Path,
    *,
    config_norm_stats: Optional[dict] = None,
    dataset_statistics: Optional[dict] = None,
    ignores_image: bool = False,
    auto_class_key: str = "AutoModelForVision2Seq",
    seed: int = 0,
    action_head_gain: float = 4.0,
    refuse_attn: tuple = (),
) -> Path:
    """Write a complete tiny checkpoint into ``directory`` and return it.

    ``config_norm_stats`` go into config.json (the model's ``norm_stats``);
    ``dataset_statistics`` into dataset_statistics.json (left out when None).
    ``auto_class_key`` is the auto_map key of the model class: OpenVLA's own
    checkpoints say "AutoModelForVision2Seq". ``action_head_gain`` scales the
    LM-head rows of the action tokens (0: the model never emits one);
    ``refuse_attn`` names attention implementations the model refuses to load with.
    """
    import torch
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, source in REMOTE_FILES.items():
        (directory / name).write_text(source)
    if config_norm_stats is None:
        config_norm_stats = norm_stats_for(DEFAULT_UNNORM_KEY)
    _write_json(
        directory / "config.json",
        {
            "model_type": "tiny_openvla",
            "architectures": ["TinyOpenVLAForActionPrediction"],
            "auto_map": {
                "AutoConfig": "configuration_tiny_openvla.TinyOpenVLAConfig",
                auto_class_key: MODEL_CLASS_REF,
            },
            "vocab_size": VOCAB_SIZE,
            "image_size": IMAGE_SIZE,
            "n_action_bins": N_ACTION_BINS,
            "norm_stats": config_norm_stats,
            "ignores_image": ignores_image,
            "refuse_attn": list(refuse_attn),
            "pad_to_multiple_of": PAD_TO_MULTIPLE_OF,
            "tie_word_embeddings": False,
        },
    )
    _write_json(
        directory / "preprocessor_config.json",
        {
            "image_processor_type": "TinyOpenVLAImageProcessor",
            "processor_class": "TinyOpenVLAProcessor",
            "image_size": IMAGE_SIZE,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "auto_map": {
                "AutoImageProcessor": "processing_tiny_openvla.TinyOpenVLAImageProcessor",
                "AutoProcessor": "processing_tiny_openvla.TinyOpenVLAProcessor",
            },
        },
    )
    _save_tokenizer(directory)
    if dataset_statistics is not None:
        _write_json(directory / "dataset_statistics.json", dataset_statistics)

    config = AutoConfig.from_pretrained(directory, trust_remote_code=True)
    model_class = get_class_from_dynamic_module(MODEL_CLASS_REF, str(directory))
    config._attn_implementation = "eager"  # refuse_attn must not stop the build
    torch.manual_seed(seed)
    model = model_class(config)
    _randomise_weights(model, seed, action_head_gain)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def copy_with_statistics(
    source: Path, destination: Path, dataset_statistics: Optional[dict]
) -> Path:
    """A copy of a built checkpoint with another (or no) dataset_statistics.json."""
    shutil.copytree(source, destination)
    stats_path = Path(destination) / "dataset_statistics.json"
    if dataset_statistics is None:
        stats_path.unlink(missing_ok=True)
    else:
        _write_json(stats_path, dataset_statistics)
    return Path(destination)


def build_lora_adapter(model_dir: Path, adapter_dir: Path, seed: int = 1) -> Path:
    """A peft LoRA adapter for the tiny model, saved the way fine-tuning runs save one.

    The LoRA B matrices are random (peft starts them at zero), so the adapter
    really changes what the model answers.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    model_class = get_class_from_dynamic_module(MODEL_CLASS_REF, str(model_dir))
    model = model_class.from_pretrained(model_dir)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(adapter_dir)
    return Path(adapter_dir)
