"""`m2r2-moe serve`: an offloaded model behind a small OpenAI-compatible HTTP server (standard library only).

- protocol.py: the completions API's requests, checked field by field, and its response bodies;
- worker.py: one generation at a time per model, a bounded queue in front, cancellation;
- server.py: the HTTP routes, streaming as server-sent events, client disconnects;
- cli.py: the sub-command (options, start, clean shutdown on SIGTERM / SIGINT).
"""
