"""`spiffy serve` and `spiffy chat`: an OpenAI-compatible server and a terminal chat over one engine loop
(docs/serving.md). The top layer: it builds its job through `spiffy.lab` as `spiffy run` does. FastAPI and
uvicorn (the `[serve]` extra) are imported only by the server itself."""
