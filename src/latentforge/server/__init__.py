"""`latentforge serve`: an AUTOMATIC1111-compatible HTTP API (FastAPI + uvicorn) over the one runner."""
