"""The `ember` command: generate, chat, and the subcommands other modules register."""

from __future__ import annotations

import argparse
import importlib
import sys

from ember.config import EngineConfig, UsageContext, add_config_cli_args, config_from_cli_args
from ember.sampling_params import SamplingParams

# Subcommand modules that expose `register(subparsers)`; imported only if present.
_PLUGINS = ("ember.cli.serve", "ember.cli.bench", "ember.cli.quantize", "ember.cli.eval", "ember.cli.kernels",
            "ember.cli.analyze", "ember.cli.sim", "ember.cli.calibrate_kv")


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--sampling-seed", type=int, default=None)


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.sampling_seed)


def stream(engine, prompt_token_ids: list[int], params: SamplingParams, out=sys.stdout) -> str:
    """Generate for one prompt, writing text to `out` as tokens are produced; return the text."""
    request_id = engine.new_request_id()
    engine.add_request(request_id, prompt_token_ids, params)
    printed = 0
    text = ""
    try:
        while engine.has_unfinished_requests():
            for output in engine.step():
                text = output.outputs[0].text
                out.write(text[printed:])
                out.flush()
                printed = len(text)
    except KeyboardInterrupt:
        engine.abort_request(request_id)
    out.write("\n")
    return text


def cmd_generate(args: argparse.Namespace) -> None:
    from ember.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_config(config_from_cli_args(args, EngineConfig))
    stream(engine, engine.tokenizer.encode(args.prompt), _sampling_params(args))


def cmd_chat(args: argparse.Namespace) -> None:
    from ember.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_config(config_from_cli_args(args, EngineConfig))
    tokenizer = engine.tokenizer
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print(f"ember chat with {engine.model_name} (empty line or Ctrl-D to quit)")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        reply = stream(engine, tokenizer.encode(prompt, add_special_tokens=False), _sampling_params(args))
        messages.append({"role": "assistant", "content": reply})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description="CPU-first LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete one prompt, streaming the output")
    gen.add_argument("--prompt", required=True)
    _add_sampling_args(gen)
    add_config_cli_args(gen, EngineConfig, UsageContext.OFFLINE)
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", help="interactive chat with the model's chat template")
    chat.add_argument("--system", default=None, help="system prompt")
    _add_sampling_args(chat)
    add_config_cli_args(chat, EngineConfig, UsageContext.OFFLINE)
    chat.set_defaults(func=cmd_chat)
    for name in _PLUGINS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
