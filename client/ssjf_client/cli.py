"""`ssjf generate`: send one prompt to the ensemble over gRPC and print tokens as they stream."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .client import SSJFClient


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ssjf generate", description=__doc__)
    ap.add_argument("prompt", nargs="?", help="the prompt (or --messages)")
    ap.add_argument("--messages", help="a conversation instead: JSON [{\"role\": ..., \"content\": ...}], or @FILE")
    ap.add_argument("--url", default=f"127.0.0.1:{os.environ.get('GRPC_PORT', '8001')}", help="gRPC host:port")
    ap.add_argument("--model", default="ssjf", help="ssjf (the ensemble) or llm (direct, no proxy)")
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--top-p", type=float, help="sampling (temperature > 0): the nucleus")
    ap.add_argument("--top-k", type=int, help="sampling (temperature > 0): the k most likely tokens")
    ap.add_argument("--seed", type=int, help="sampling: the same seed gives the same tokens")
    ap.add_argument("--stop", action="append", help="end the text before this string (repeat for up to 4)")
    ap.add_argument("--priority", type=int, help="a priority class: lower is served first (default 0)")
    ap.add_argument("--no-stream", action="store_true", help="one response with the whole text")
    args = ap.parse_args(argv)
    messages = None
    if args.messages:
        messages = json.loads(open(args.messages[1:]).read() if args.messages.startswith("@") else args.messages)
    if (args.prompt is None) == (messages is None):
        ap.error("give a prompt or --messages")
    with SSJFClient(args.url, args.model) as client:
        result = client.generate(args.prompt, args.max_tokens, args.ignore_eos or None, not args.no_stream,
                                 args.temperature, on_text=lambda t: print(t, end="", flush=True), messages=messages,
                                 priority=args.priority, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                 stop=args.stop)
    print()
    if not result.ok:
        print(f"error: {result.error}", file=sys.stderr)
        return 1
    print(f"[predicted_length={result.predicted_length} ttft={result.ttft_s * 1000:.0f}ms "
          f"jct={result.jct_s * 1000:.0f}ms chunks={result.chunks}]", file=sys.stderr)
    return 0


COMMANDS = {"generate": ("ssjf_client.cli:main", "send one prompt over gRPC and stream the answer")}
