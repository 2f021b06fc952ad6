"""worldserve server side: the `worldserve` command line (and, with the server issue, the game server).

Imports only `engine`'s public API.
"""
