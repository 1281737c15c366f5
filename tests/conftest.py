import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class ListSink:
    """Collects what the engine sends for one request."""

    def __init__(self):
        self.parts: list[str] = []
        self.tokens: list[int] = []  # the output tokens each send covered
        self.reason: str | None = None  # the final send's finish reason
        self.finals = 0
        self.errors: list[str] = []
        self.cancelled = False

    def send(self, text: str, final: bool, tokens: int = 0, reason: str | None = None) -> None:
        assert self.finals == 0, "a send after the final response"
        self.parts.append(text)
        self.tokens.append(tokens)
        self.reason = reason
        self.finals += final

    def error(self, message: str) -> None:
        assert self.finals == 0, "an error after the final response"
        self.errors.append(message)
        self.finals += 1

    def is_cancelled(self) -> bool:
        return self.cancelled

    @property
    def text(self) -> str:
        return "".join(self.parts)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from ssjf.assets import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path())


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    """A 2-layer random Llama with SmolLM2's vocabulary and GQA (4 query heads, 2 KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.3, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()
