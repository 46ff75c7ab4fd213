"""The local HTTP service (`make-your-3d serve`) the Blender add-on talks to.

server.py  process: loopback bind, state file, parent/idle watchers, graceful shutdown
app.py     the /v1 JSON API (FastAPI): auth, validation, error bodies, body size limit
store.py   SQLite job store (jobs + events), crash recovery
worker.py  the single worker thread running jobs through the Generator
inputs.py  uploaded images stored once by content hash
"""
