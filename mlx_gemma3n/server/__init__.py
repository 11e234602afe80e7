"""An OpenAI-compatible HTTP server: `python -m mlx_gemma3n.server --model M`.

app.py is the HTTP front (Starlette, run by uvicorn), requests.py validates request bodies into
`GenerationRequest`s, media.py decodes the images and audio they carry, engine.py batches the running
requests in one worker thread that owns the model, decoding.py holds one sequence's sampling and
stop rules, prefix_cache.py keeps the caches of recent prompts for reuse.
"""
