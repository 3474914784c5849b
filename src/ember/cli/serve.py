"""`ember serve`: the OpenAI-compatible HTTP server on one engine."""

from __future__ import annotations

import argparse
import logging
import sys
import threading

from ember.config import EngineConfig, UsageContext, add_config_cli_args, config_from_cli_args
from ember.distributed.config import ParallelConfig
from ember.server.config import ServerConfig


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `serve` subcommand: every ServerConfig and EngineConfig field is a flag."""
    parser = subparsers.add_parser(
        "serve", help="start the OpenAI-compatible server",
        description="Serve /v1/chat/completions, /v1/completions, /v1/models, /tokenize, /detokenize, "
                    "/health, /version and /metrics on one engine.")
    add_config_cli_args(parser, ServerConfig)
    add_config_cli_args(parser, EngineConfig, UsageContext.SERVING)
    add_config_cli_args(parser, ParallelConfig)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> None:
    """Start the server; the engine loads in the background (/health answers 503 until it is ready).

    Raises:
        SystemExit: 2 for invalid options, 1 if the engine fails to load.
    """
    import uvicorn

    from ember.distributed.launch import create_engine
    from ember.reasoning import create_reasoning_parser
    from ember.server.app import build_app
    from ember.server.draining import DrainingServer

    try:
        server_config = config_from_cli_args(args, ServerConfig)
        engine_config = config_from_cli_args(args, EngineConfig)
        parallel_config = config_from_cli_args(args, ParallelConfig)
    except ValueError as exc:
        raise SystemExit(f"ember serve: {exc}") from None
    if server_config.lora_modules and not engine_config.enable_lora:
        raise SystemExit("ember serve: --lora-modules needs --enable-lora")
    logging.basicConfig(level=server_config.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    def make_engine():
        engine = create_engine(engine_config, parallel_config)
        if server_config.reasoning_parser is not None:  # structured output starts after the reasoning
            parser = create_reasoning_parser(server_config.reasoning_parser, engine.tokenizer)
            engine.structured_output.is_reasoning_end = parser.is_reasoning_end
        return engine

    app = build_app(make_engine, server_config)
    async_engine = app.state.async_engine
    server = DrainingServer(uvicorn.Config(app, host=server_config.host, port=server_config.port,
                                           log_level=server_config.log_level, timeout_graceful_shutdown=5),
                            async_engine, server_config.shutdown_timeout_s)

    def stop_if_load_fails() -> None:
        if not async_engine.wait_ready() and async_engine.state == "dead":
            logging.getLogger("ember.server").error("the engine did not load; shutting down")
            server.should_exit = True

    threading.Thread(target=stop_if_load_fails, daemon=True).start()
    server.run()
    if async_engine.state == "dead":
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    """`python -m ember.cli.serve ...`, the same as `ember serve ...`."""
    parser = argparse.ArgumentParser(prog="ember")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    args.func(args)


if __name__ == "__main__":
    main()
