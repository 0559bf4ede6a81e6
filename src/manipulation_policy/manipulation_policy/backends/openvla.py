"""OpenVLA through Hugging Face transformers, loaded the way OpenVLA is meant to be.

``AutoProcessor`` and the vision-to-sequence auto class with
``trust_remote_code=True`` load a Hub id (``openvla/openvla-7b``) or a local
checkpoint directory (a fine-tuned run). Each observation becomes the prompt
``In: What action should the robot take to {instruction}?\\nOut:`` plus the
camera image; ``model.predict_action(..., unnorm_key=..., do_sample=False)``
answers with a 7-dim action in upstream's action-vector layout, which
``core.upstream_compat.convert_action_vector`` turns into a PolicyAction with the
settings of the backend's options (``openvla_options``, declared there once).

Everything that can be checked is checked at start-up, so a bad setting
fails there with a BackendStartupError saying why and how to fix it: option
values, CUDA for quantization, the un-normalisation key, the LoRA adapter
directory, and (``check_image_sensitivity``) whether the model looks at its
image at all: it must answer clearly different images with different action
tokens.

What each transformers line does with OpenVLA's remote code (its
``prismatic/extern/hf`` files) is handled here, not left to luck:

- ``predict_action`` appends token 29871 ("\u2581") to ``input_ids`` but not to
  ``attention_mask``; eager attention then fails on the short mask (sdpa only
  got away with it because an all-ones mask is dropped). The backend appends
  the token and its mask entry itself, so ``predict_action`` has nothing to add.
- 4.50 to 4.57 refuse sdpa on this class with an AttributeError (the "auto"
  chain falls back to eager) and their ``generate`` hands the model a KV cache
  from the first step, which makes the remote code skip the image
  (openvla/openvla#346); the backend decodes without a KV cache there.
- 5.x cannot import the remote code at all; start-up says which pip install
  fixes it.

This module imports torch and transformers; the backend registry imports it
only when the "openvla" backend is chosen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.util
import json
import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import transformers
from packaging.version import Version
from PIL import Image

from manipulation_policy.backends import openvla_batching, openvla_options
from manipulation_policy.backends.torch_device import (  # noqa: F401 (the tests read them here)
    DTYPE_NAMES,
    resolve_device,
    resolve_dtype,
)
from manipulation_policy.core.errors import BackendStartupError, InputError
from manipulation_policy.core.options import is_unset, resolve
from manipulation_policy.core.policy_types import Observation, PolicyAction
from manipulation_policy.core.upstream_compat import ACTION_VECTOR_DIM, convert_action_vector

logger = logging.getLogger(__name__)

# transformers 4.x calls the auto class AutoModelForVision2Seq; 5.x renamed it
# AutoModelForImageTextToText. OpenVLA's config.json names the 4.x one.
VISION2SEQ_AUTO_CLASS_NAMES = ("AutoModelForVision2Seq", "AutoModelForImageTextToText")
# The vocabularies are openvla_options'; "none" and "auto" are resolved below.
QUANTIZATION_CHOICES = tuple(q for q in openvla_options.QUANTIZATIONS if q != "none")
ATTN_IMPLEMENTATIONS = tuple(a for a in openvla_options.ATTN_IMPLEMENTATIONS if a != "auto")
DATASET_STATISTICS_FILE = "dataset_statistics.json"
FIXED_TRANSFORMERS = "4.40.1"
FIXED_STACK_PIP = "pip install transformers==4.40.1 tokenizers==0.19.1 timm==0.9.10"
IMAGE_REGRESSION_SINCE = Version("4.50")
REMOTE_CODE_UNIMPORTABLE_SINCE = Version("5")
PROBE_INSTRUCTION = "pick up the object"
# OpenVLA's predict_action appends this id (Llama-2's "\u2581") when the prompt does
# not end with it, as at training time; it is hard-coded there, so it is here.
PROMPT_END_TOKEN_ID = 29871
# Ways transformers refuses an attention implementation at load time: ValueError /
# ImportError (not supported / package missing), AttributeError (4.50-4.57 ask the
# remote class's _supports_sdpa property before its language model exists).
ATTN_REFUSALS = (ValueError, ImportError, AttributeError)


_unset = is_unset


def build_prompt(instruction: str) -> str:
    """OpenVLA's prompt; the instruction lower-cased and stripped as OpenVLA does."""
    return f"In: What action should the robot take to {instruction.strip().lower()}?\nOut:"


def resolve_auto_model_class(module: Any = transformers) -> tuple[str, Any]:
    """(name, class) of the vision-to-sequence auto class this transformers has."""
    for name in VISION2SEQ_AUTO_CLASS_NAMES:
        auto_class = getattr(module, name, None)
        if auto_class is not None:
            return name, auto_class
    raise BackendStartupError(
        f"transformers {getattr(module, '__version__', '?')} has none of "
        f"{', '.join(VISION2SEQ_AUTO_CLASS_NAMES)}; install transformers=={FIXED_TRANSFORMERS}"
    )


def alias_auto_map(auto_map: Optional[dict], auto_class_name: str) -> dict:
    """auto_map with an entry for ``auto_class_name``, borrowed from its other name.

    A checkpoint written for transformers 4.x maps only "AutoModelForVision2Seq"
    to its remote class; 5.x looks up "AutoModelForImageTextToText" (and vice
    versa for a checkpoint written under 5.x).
    """
    auto_map = dict(auto_map or {})
    if auto_class_name not in auto_map:
        for alias in VISION2SEQ_AUTO_CLASS_NAMES:
            if alias in auto_map:
                auto_map[auto_class_name] = auto_map[alias]
                break
    return auto_map


def resolve_quantization(
    requested: Any, device: str, bitsandbytes_available: bool
) -> Optional[str]:
    """None, "8bit" or "4bit"; quantization needs CUDA and bitsandbytes."""
    if _unset(requested):
        return None
    name = str(requested).strip().lower()
    if name not in QUANTIZATION_CHOICES:
        raise BackendStartupError(
            f"quantization must be 'none', '8bit' or '4bit', got {requested!r}"
        )
    if not device.startswith("cuda"):
        raise BackendStartupError(
            f"quantization {name!r} needs a CUDA GPU (bitsandbytes), but the device is "
            f"{device!r}; use quantization 'none' on this machine"
        )
    if not bitsandbytes_available:
        raise BackendStartupError(
            f"quantization {name!r} needs the bitsandbytes package, which is not installed "
            "(pip install bitsandbytes), or use quantization 'none'"
        )
    return name


def attn_implementation_candidates(requested: Any, device: str) -> list[str]:
    """Attention implementations to try, best first."""
    name = "auto" if _unset(requested) else str(requested).strip().lower()
    on_cuda = device.startswith("cuda")
    if name == "auto":
        return ["flash_attention_2", "sdpa", "eager"] if on_cuda else ["sdpa", "eager"]
    if name not in ATTN_IMPLEMENTATIONS:
        raise BackendStartupError(
            f"attn_implementation must be 'auto' or one of {', '.join(ATTN_IMPLEMENTATIONS)}, "
            f"got {requested!r}"
        )
    if name == "flash_attention_2" and not on_cuda:
        raise BackendStartupError(
            f"attn_implementation 'flash_attention_2' needs CUDA, but the device is {device!r}"
        )
    return [name]


def select_unnorm_key(norm_stats: dict, requested: Optional[str], source: str) -> str:
    """The dataset key whose statistics un-normalise actions."""
    keys = sorted(norm_stats)
    if not keys:
        raise BackendStartupError(f"{source} holds no dataset statistics (norm_stats is empty)")
    if requested is None:
        if len(keys) > 1:
            raise BackendStartupError(
                f"the model was trained on several datasets; set unnorm_key to one of "
                f"{', '.join(keys)} (from {source})"
            )
        return keys[0]
    if requested not in norm_stats:
        raise BackendStartupError(
            f"unnorm_key {requested!r} is not in {source}; valid keys: {', '.join(keys)}"
        )
    return requested


def action_dim_of(norm_stats: dict, key: str, source: str) -> int:
    try:
        return len(norm_stats[key]["action"]["q01"])
    except (KeyError, TypeError) as exc:
        raise BackendStartupError(
            f"{source}: statistics for {key!r} lack action.q01 (OpenVLA's norm_stats format)"
        ) from exc


def image_probes(size: int = 224) -> list[np.ndarray]:
    """Clearly different synthetic camera frames (RGB, uint8)."""
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    gradient = np.stack(
        [
            np.tile(ramp, (size, 1)),
            np.tile(ramp[:, None], (1, size)),
            255 - np.tile(ramp, (size, 1)),
        ],
        axis=-1,
    )
    dark_with_square = np.zeros((size, size, 3), np.float32)
    dark_with_square[size // 4 : size // 2, size // 2 : 3 * size // 4] = (255, 220, 0)
    red = np.zeros((size, size, 3), np.float32)
    red[..., 0] = 230
    return [a.astype(np.uint8) for a in (gradient, dark_with_square, red)]


def input_problem(observation: Observation) -> Optional[str]:
    if observation.image is None:
        return "no camera image in the observation"
    if not (observation.instruction or "").strip():
        return "no task instruction in the observation"
    return None


def image_from_observation(image: Any) -> Image.Image:
    if image is None:
        raise InputError("image", "the openvla backend needs a camera image; none was given")
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", type(image).__name__)
        raise InputError("image", f"expected an HxWx3 RGB array, got {shape}")
    if image.dtype != np.uint8:
        raise InputError("image", f"expected uint8 pixels, got {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError("image", "image is empty")
    return Image.fromarray(np.ascontiguousarray(image), "RGB")


def _load_local_statistics(model: str) -> Optional[dict]:
    path = Path(model).expanduser() / DATASET_STATISTICS_FILE
    if not path.is_file():
        return None
    try:
        stats = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BackendStartupError(f"cannot read {path}: {exc}") from exc
    if not isinstance(stats, dict):
        raise BackendStartupError(f"{path} must hold a JSON object keyed by dataset name")
    return stats


def append_prompt_end_token(inputs: Any, token_id: int = PROMPT_END_TOKEN_ID) -> Any:
    """``inputs`` with ``token_id`` appended to input_ids and a 1 to attention_mask.

    What OpenVLA's predict_action does to input_ids alone; doing it here keeps
    the mask as long as the ids, which eager attention needs.
    """
    input_ids = inputs["input_ids"]
    if bool(torch.all(input_ids[:, -1] == token_id)):
        return inputs
    column = torch.full((input_ids.shape[0], 1), token_id, dtype=input_ids.dtype)
    inputs["input_ids"] = torch.cat([input_ids, column.to(input_ids.device)], dim=1)
    mask = inputs.get("attention_mask")
    if mask is not None:
        ones = torch.ones((mask.shape[0], 1), dtype=mask.dtype, device=mask.device)
        inputs["attention_mask"] = torch.cat([mask, ones], dim=1)
    return inputs


def remote_code_failure(model: str, exc: BaseException, version: Optional[str] = None) -> str:
    """One line for a checkpoint whose remote code failed to import or build."""
    version = version or transformers.__version__
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if Version(version) >= REMOTE_CODE_UNIMPORTABLE_SINCE:
        return (
            f"OpenVLA's remote code for {model!r} cannot run under transformers {version} "
            f"({type(exc).__name__}: {first_line}); it needs transformers 4.x: {FIXED_STACK_PIP}"
        )
    return f"cannot load OpenVLA model {model!r}: {type(exc).__name__}: {first_line}"


def decodes_without_kv_cache(version: Optional[str] = None) -> bool:
    """True where OpenVLA's remote code loses the image if generate keeps a KV cache."""
    return Version(version or transformers.__version__) >= IMAGE_REGRESSION_SINCE


def action_token_range(model: Any) -> Optional[tuple[int, int]]:
    """[first, end) of OpenVLA's action token ids: the last n_action_bins ids below vocab_size."""
    vocab_size = getattr(model, "vocab_size", None)
    bins = getattr(getattr(model, "config", None), "n_action_bins", None)
    if not isinstance(vocab_size, int) or not isinstance(bins, int):
        return None
    return vocab_size - bins, vocab_size


def action_model(model: Any) -> Any:
    """The OpenVLA model itself, owner of ``predict_action`` (under a peft wrapper, if any)."""
    return getattr(getattr(model, "predict_action", None), "__self__", model)


@contextlib.contextmanager
def recording_generated_tokens(model: Any) -> Iterator[list]:
    """Record the ids that predict_action's ``self.generate`` call produces.

    OpenVLA's predict_action returns only the un-normalised action; the image
    check needs the tokens behind it. An instance attribute shadows the
    ``generate`` method for the duration (start-up only, one thread).
    """
    target = action_model(model)
    original = getattr(target, "generate", None)
    record: list = []
    if original is None:
        yield record
        return

    def generate(*args: Any, **kwargs: Any) -> Any:
        ids = original(*args, **kwargs)
        count = kwargs.get("max_new_tokens") or ACTION_VECTOR_DIM
        sequences = getattr(ids, "sequences", ids)
        record.append([int(t) for t in sequences[0, -count:].tolist()])
        return ids

    target.__dict__["generate"] = generate
    try:
        yield record
    finally:
        target.__dict__.pop("generate", None)


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    # transformers renamed torch_dtype to dtype in 4.56; 4.40 knows only torch_dtype.
    if Version(transformers.__version__) >= Version("4.56"):
        return {"dtype": dtype}
    return {"torch_dtype": dtype}


def _version_cause(version: str) -> str:
    if Version(version) >= IMAGE_REGRESSION_SINCE:
        return (
            f"transformers {version} is in the range where OpenVLA's remote code drops the "
            f"image (openvla/openvla#346) and this backend already decodes without the KV "
            f"cache that triggers it; the stack OpenVLA was written for: transformers=="
            f"{FIXED_TRANSFORMERS}: {FIXED_STACK_PIP}"
        )
    return (
        f"transformers {version} is not affected by openvla/openvla#346, so the model "
        "or its processor ignores images; check the checkpoint"
    )


def image_check_problem(
    model: str,
    actions: Sequence[np.ndarray],
    tokens: Sequence[Optional[list]],
    token_range: Optional[tuple[int, int]],
    version: Optional[str] = None,
) -> Optional[str]:
    """Why the image check refuses the probe answers, or None when they pass.

    ``tokens`` are the generated ids per probe (None where they could not be
    recorded: then the actions are compared). A model that never emits an
    action token is reported as such, not as "ignores images".
    """
    version = version or transformers.__version__
    suffix = " (check_image_sensitivity=False skips this check.)"
    known = [t for t in tokens if t is not None]
    if len(known) == len(tokens) and known:
        if token_range is not None:
            first, end = token_range
            if not any(first <= t < end for seq in known for t in seq):
                return (
                    f"refusing to start: {model!r} emitted no action token for "
                    f"{len(known)} probe images (generated ids {known}; OpenVLA's action "
                    f"tokens are ids {first}..{end - 1}), so its answers are not actions: "
                    "its language-model head or vocabulary is not an OpenVLA action head."
                    + suffix
                )
        if any(seq != known[0] for seq in known[1:]):
            return None
        seen = f"the same action tokens {known[0]} (action {np.round(actions[0], 6).tolist()})"
    else:
        if any(not np.array_equal(actions[0], other) for other in actions[1:]):
            return None
        seen = f"the same action {np.round(actions[0], 6).tolist()}"
    return (
        f"refusing to start: {model!r} gave {seen} for {len(actions)} clearly different "
        f"images, so it ignores its camera input. {_version_cause(version)}." + suffix
    )


class OpenVLABackend:
    name = "openvla"

    # Declared once; flags, variables, node parameters and launch arguments derive from it.
    OPTIONS = openvla_options.OPTIONS

    def __init__(self, check_image_sensitivity: bool = True, **options: Any):
        """``options``: any of ``OPTIONS`` by name (absent or None: its default), checked
        by its declaration as the server's flags and the node's parameters are."""
        try:
            chosen = resolve(self.OPTIONS, options)
            self._conversion = openvla_options.conversion_from_options(chosen)
        except ValueError as exc:
            raise BackendStartupError(str(exc)) from exc
        self.model_id = chosen["model"]
        device, dtype, quantization = chosen["device"], chosen["dtype"], chosen["quantization"]
        lora_adapter, unnorm_key = chosen["lora_adapter"], chosen["unnorm_key"]
        attn_implementation = chosen["attn_implementation"]

        cuda = torch.cuda.is_available()
        self.device = resolve_device(device, cuda)
        bf16 = self.device.startswith("cuda") and torch.cuda.is_bf16_supported()
        self.dtype = resolve_dtype(dtype, self.device, bf16)
        self.quantization = resolve_quantization(
            quantization, self.device, importlib.util.find_spec("bitsandbytes") is not None
        )
        attn_candidates = attn_implementation_candidates(attn_implementation, self.device)
        self.lora_adapter = None if _unset(lora_adapter) else self._check_adapter_dir(lora_adapter)
        self._local_dir = self._check_model_location(self.model_id)
        if self._local_dir:
            self.model_id = str(Path(self.model_id).expanduser())

        auto_name, auto_class = resolve_auto_model_class()
        self.auto_class_name = auto_name
        self._processor, config = self._load_processor_and_config(auto_name)

        local_stats = _load_local_statistics(self.model_id) if self._local_dir else None
        if local_stats is not None:
            stats, source = local_stats, f"{self.model_id}/{DATASET_STATISTICS_FILE}"
        else:
            stats = getattr(config, "norm_stats", None) or {}
            source = f"the norm_stats of {self.model_id}'s config"
        requested_key = None if _unset(unnorm_key) else str(unnorm_key).strip()
        self.unnorm_key = select_unnorm_key(stats, requested_key, source)
        dim = action_dim_of(stats, self.unnorm_key, source)
        if dim != ACTION_VECTOR_DIM:
            raise BackendStartupError(
                f"{source}: {self.unnorm_key!r} has {dim}-dim actions; this backend needs "
                f"OpenVLA's {ACTION_VECTOR_DIM} (dx, dy, dz, droll, dpitch, dyaw, gripper)"
            )

        self._model, self.attn_implementation = self._load_model(
            auto_class, config, attn_candidates
        )
        if local_stats is not None:
            # As OpenVLA's own deployment does for fine-tuned checkpoints.
            self._model.norm_stats = local_stats
        self.lora_merged = False
        if self.lora_adapter is not None:
            self._model, self.lora_merged = self._apply_lora(self._model)
        if self.quantization is None:
            # transformers >= 4.56 builds OpenVLA's language model in its text_config's
            # dtype (bf16) whatever dtype was asked for; one dtype for the whole model.
            self._model = self._model.to(self.device, self.dtype)
        self._model.eval()
        self.kv_cache = not decodes_without_kv_cache()
        self._generate_options = {} if self.kv_cache else {"use_cache": False}
        if not self.kv_cache:
            logger.warning(
                "transformers %s: decoding without a KV cache (slower), because OpenVLA's "
                "remote code drops the image when generate hands it a cache "
                "(openvla/openvla#346). For full speed: %s",
                transformers.__version__,
                FIXED_STACK_PIP,
            )
        self._input_device = self._model_device()
        self._lock = threading.Lock()
        self.last_hold_reason: Optional[str] = None
        self.image_sensitivity_checked = False
        if check_image_sensitivity:
            self._check_image_sensitivity()
            self.image_sensitivity_checked = True
        self.batched_decoding_problem = self._batched_decoding_problem()

    # --- start-up -------------------------------------------------------------------

    @staticmethod
    def _check_adapter_dir(lora_adapter: str) -> str:
        path = Path(str(lora_adapter).strip()).expanduser()
        if not path.is_dir():
            raise BackendStartupError(f"lora_adapter directory {str(path)!r} does not exist")
        if not (path / "adapter_config.json").is_file():
            raise BackendStartupError(
                f"lora_adapter {str(path)!r} has no adapter_config.json; "
                "expected a directory saved by peft (PeftModel.save_pretrained)"
            )
        if importlib.util.find_spec("peft") is None:
            raise BackendStartupError("lora_adapter needs the peft package (pip install peft)")
        return str(path)

    @staticmethod
    def _check_model_location(model: str) -> bool:
        """True for a local checkpoint directory; a path that is missing is refused."""
        path = Path(model).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise BackendStartupError(f"model directory {model!r} has no config.json")
            return True
        looks_like_path = model.startswith(("/", ".", "~")) or model.count("/") > 1
        if looks_like_path or path.exists():
            raise BackendStartupError(f"model directory {model!r} does not exist")
        return False

    def _load_processor_and_config(self, auto_name: str) -> tuple[Any, Any]:
        try:
            processor = transformers.AutoProcessor.from_pretrained(
                self.model_id, trust_remote_code=True
            )
            config = transformers.AutoConfig.from_pretrained(self.model_id, trust_remote_code=True)
        except ImportError as exc:
            raise BackendStartupError(remote_code_failure(self.model_id, exc)) from exc
        except (OSError, ValueError) as exc:
            raise BackendStartupError(
                f"cannot load OpenVLA model {self.model_id!r}: {exc}"
            ) from exc
        auto_map = alias_auto_map(getattr(config, "auto_map", None), auto_name)
        if auto_name not in auto_map:
            raise BackendStartupError(
                f"{self.model_id!r} maps none of {', '.join(VISION2SEQ_AUTO_CLASS_NAMES)} to "
                "remote code in its config.json auto_map; is it an OpenVLA checkpoint?"
            )
        config.auto_map = auto_map
        return processor, config

    def _load_model(self, auto_class: Any, config: Any, candidates: Sequence[str]):
        kwargs: dict[str, Any] = {"config": config, "trust_remote_code": True}
        kwargs.update(_dtype_kwargs(self.dtype))
        if importlib.util.find_spec("accelerate") is not None:
            kwargs["low_cpu_mem_usage"] = True
        if self.quantization is not None:
            kwargs["quantization_config"] = self._bitsandbytes_config()
            index = torch.device(self.device).index
            kwargs["device_map"] = {"": index if index is not None else 0}

        failures = []
        for attn in candidates:
            if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
                reason = "the flash_attn package is not installed"
                logger.info("attn_implementation flash_attention_2 skipped: %s", reason)
                failures.append(f"{attn}: {reason}")
                continue
            # transformers 4.40 ignores attn_implementation="eager" next to a config
            # object whose implementation is unset, so the config says it too.
            config._attn_implementation = attn
            try:
                model = auto_class.from_pretrained(
                    self.model_id, attn_implementation=attn, **kwargs
                )
            except ATTN_REFUSALS as exc:
                reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
                if len(candidates) == 1:
                    raise BackendStartupError(
                        f"cannot load {self.model_id!r} with attn_implementation {attn!r} under "
                        f"transformers {transformers.__version__} ({reason}); use "
                        f"attn_implementation 'auto' or another one, or {FIXED_STACK_PIP}"
                    ) from exc
                logger.warning("attn_implementation %s refused, trying the next: %s", attn, reason)
                failures.append(f"{attn}: {reason}")
                continue
            except NotImplementedError as exc:
                # OpenVLA's remote code refuses timm versions other than 0.9.10-0.9.16 this way.
                failure = remote_code_failure(self.model_id, exc)
                raise BackendStartupError(f"{failure}; OpenVLA's stack: {FIXED_STACK_PIP}") from exc
            except OSError as exc:
                raise BackendStartupError(
                    f"cannot load OpenVLA model {self.model_id!r}: {exc}"
                ) from exc
            used = getattr(model.config, "_attn_implementation", None) or attn
            if failures:
                logger.info("OpenVLA uses attn_implementation %s (%s)", used, "; ".join(failures))
            return model, used
        raise BackendStartupError(
            f"cannot load {self.model_id!r} with any attention implementation: "
            + "; ".join(failures)
        )

    def _bitsandbytes_config(self) -> Any:
        if self.quantization == "8bit":
            return transformers.BitsAndBytesConfig(load_in_8bit=True)
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=self.dtype,
            bnb_4bit_quant_type="nf4",
        )

    def _apply_lora(self, model: Any) -> tuple[Any, bool]:
        from peft import PeftModel

        try:
            peft_model = PeftModel.from_pretrained(model, self.lora_adapter)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise BackendStartupError(
                f"cannot load lora_adapter {self.lora_adapter!r} onto {self.model_id!r}: {exc}"
            ) from exc
        if self.quantization is not None:
            # Merging into 8/4-bit weights would round the adapter away; keep it beside them.
            return peft_model, False
        return peft_model.merge_and_unload(), True

    def _model_device(self) -> torch.device:
        try:
            return next(self._model.parameters()).device
        except StopIteration:
            return torch.device(self.device)

    def _check_image_sensitivity(self) -> None:
        """Refuse a model whose action tokens do not depend on the image."""
        prompt = build_prompt(PROBE_INSTRUCTION)
        actions, tokens = [], []
        with recording_generated_tokens(self._model) as record:
            for index, probe in enumerate(image_probes()):
                actions.append(self._predict_raw(Image.fromarray(probe), prompt))
                tokens.append(record[index] if len(record) > index else None)
        problem = image_check_problem(
            self.model_id, actions, tokens, action_token_range(action_model(self._model))
        )
        if problem is not None:
            raise BackendStartupError(problem)

    # --- inference ------------------------------------------------------------------

    def _model_input(self, observation: Observation) -> tuple[Image.Image, str]:
        """The image and the prompt the model gets for ``observation`` (InputError if none)."""
        image = image_from_observation(observation.image)
        instruction = (observation.instruction or "").strip()
        if not instruction:
            raise InputError("instruction", "the openvla backend needs a task instruction")
        return image, build_prompt(instruction)

    def _prepared(self, image: Image.Image, prompt: str) -> Any:
        """One row of model input on the model's device, ending with token 29871 and its
        mask entry (call under the lock and inference_mode)."""
        inputs = self._processor(prompt, image).to(self._input_device, dtype=self.dtype)
        return append_prompt_end_token(inputs)

    def _predict_raw(self, image: Image.Image, prompt: str) -> np.ndarray:
        with self._lock, torch.inference_mode():
            action = self._model.predict_action(
                **self._prepared(image, prompt),
                unnorm_key=self.unnorm_key,
                do_sample=False,
                **self._generate_options,
            )
        return np.asarray(action, dtype=np.float64).reshape(-1)

    def predict_raw(self, observation: Observation) -> np.ndarray:
        """The model's un-normalised 7-dim action for ``observation``."""
        return self._predict_raw(*self._model_input(observation))

    def _to_action(self, raw: np.ndarray, observation: Observation) -> PolicyAction:
        """The model's raw action as the answer to ``observation``: its own per-request
        overrides, the gripper meaning, the step bounds; a rejected output is a hold."""
        converted = convert_action_vector(raw, observation, self._conversion)
        self.last_hold_reason = converted.hold_reason
        if converted.hold_reason is not None:
            logger.warning("OpenVLA output rejected: %s", converted.hold_reason)
        return converted.action

    def predict(self, observation: Observation) -> PolicyAction:
        # The contract makes image and instruction optional (the guide's minimal
        # request has neither); without them the model has nothing to act on, so
        # the answer is the safe hold rather than an error or a guess.
        problem = input_problem(observation)
        if problem is not None:
            self.last_hold_reason = problem
            return PolicyAction.hold(observation.reference_frame)
        return self._to_action(self.predict_raw(observation), observation)

    # --- batched inference (openvla_batching.py) --------------------------------------

    def _batched_decoding_problem(self) -> Optional[str]:
        """Why observations cannot be batched with this model, or None when they can:
        the batched path must answer the probe images exactly as one at a time.
        (Also warms up the batched shapes before the first request.)"""
        owner = action_model(self._model)
        problem = openvla_batching.generation_problem(getattr(owner, "generation_config", None))
        if problem is None:
            prompt = build_prompt(PROBE_INSTRUCTION)
            images = [Image.fromarray(p) for p in image_probes()]
            try:
                alone = [self._predict_raw(image, prompt) for image in images]
                together = self._predict_raw_batch([(image, prompt) for image in images])
            except Exception as exc:  # noqa: BLE001 - any failure means: do not batch
                problem = f"the batched path failed: {type(exc).__name__}: {exc}"
            else:
                if any(not np.array_equal(a, b) for a, b in zip(alone, together, strict=True)):
                    problem = "batched answers differ from single ones on the probe images"
        if problem is not None:
            logger.warning("OpenVLA: observations are predicted one at a time: %s", problem)
        return problem

    @property
    def batches_observations(self) -> bool:
        """Whether predict_batch really predicts observations together (the server
        collects requests into batches only then)."""
        return self.batched_decoding_problem is None

    def _predict_raw_batch(self, inputs: Sequence[tuple[Image.Image, str]]) -> list[np.ndarray]:
        with self._lock, torch.inference_mode():
            rows = [self._prepared(image, prompt) for image, prompt in inputs]
            # Without a KV cache where transformers' cache makes the remote code drop
            # the image (4.50-4.57), as predict_action is called there.
            return openvla_batching.predict_raw_batch(
                action_model(self._model), rows, self.unnorm_key, use_cache=self.kv_cache
            )

    def predict_batch(self, observations: Sequence[Observation]) -> list[Any]:
        """One answer per observation, each what ``predict`` answers it alone; an
        observation that cannot be predicted has its InputError as its answer."""
        outcomes: list[Any] = [None] * len(observations)
        ready: list[tuple[int, Image.Image, str]] = []
        for index, observation in enumerate(observations):
            try:
                if input_problem(observation) is not None:
                    outcomes[index] = self.predict(observation)  # the safe hold
                else:
                    ready.append((index, *self._model_input(observation)))
            except InputError as exc:
                outcomes[index] = exc
        if self.batched_decoding_problem is not None or len(ready) < 2:
            raw_actions = [self._predict_raw(image, prompt) for _, image, prompt in ready]
        else:
            raw_actions = self._predict_raw_batch([(image, prompt) for _, image, prompt in ready])
        for (index, _image, _prompt), raw in zip(ready, raw_actions, strict=True):
            outcomes[index] = self._to_action(raw, observations[index])
        return outcomes

    def close(self) -> None:
        """Let the weights go (the in-process node's cleanup): with the last reference
        dropped, their GPU memory returns to the device."""
        self._model = None
        self._processor = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "model": self.model_id,
            "device": str(self._input_device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "quantization": self.quantization or "none",
            "lora_adapter": self.lora_adapter,
            "lora_merged": self.lora_merged,
            "unnorm_key": self.unnorm_key,
            "attn_implementation": self.attn_implementation,
            "auto_class": self.auto_class_name,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            # The conversion settings, by their option names (bounds as lists).
            **{
                name: list(value) if isinstance(value, tuple) else value
                for name, value in dataclasses.asdict(self._conversion).items()
            },
            "image_sensitivity_checked": self.image_sensitivity_checked,
            "kv_cache": self.kv_cache,
            "batched_decoding": self.batched_decoding_problem is None,
            "batched_decoding_off_reason": self.batched_decoding_problem,
        }
