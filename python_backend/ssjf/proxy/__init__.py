"""The proxy model, serving side: the encoder (encoder.py), the head (head.py), the predictor the
length_predictor model runs (predictor.py), and the learner that refreshes the head from the
true lengths the llm model observes (learner.py). Training lives in ssjf_tools (train-proxy)."""

from .predictor import DEFAULT_ARTIFACT, LengthPredictor, read_meta, resolve_artifact

__all__ = ["DEFAULT_ARTIFACT", "LengthPredictor", "read_meta", "resolve_artifact"]
