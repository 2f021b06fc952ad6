"""worldserve clients: the browser page and the Python agent SDK, which talk to the server over the protocol only.

Empty until the clients issue (#5) lands; the package exists so the layout and packaging are settled.
"""
