"""`brisk serve`: streaming sessions over WebSocket, batched through the GPE engine (see app.py, scheduler.py)."""
