"""worldserve server side: the game server (FastAPI + WebSocket protocol v1) and the `worldserve` command line."""
