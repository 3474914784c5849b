"""OpenAI-compatible HTTP server: an asyncio wrapper over the engine, the FastAPI app, metrics."""
