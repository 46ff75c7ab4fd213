"""`make-your-3d users add|list|remove`: the remote backend's per-user tokens (service/users.py)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from make_your_3d.paths import default_data_dir
from make_your_3d.service.users import UserStore


def _store(args: Any) -> UserStore:
    return UserStore(Path(args.data).expanduser() if args.data else default_data_dir())


def run_add(args: Any) -> int:
    store = _store(args)
    token = store.add(args.name)
    if args.json:
        print(json.dumps({"name": args.name, "token": token}))
    else:
        print(f"Added user {args.name!r}. Their token (shown only now; give it to them privately):")
        print(token)
        print("In Blender: Preferences > Add-ons > Make-Your-3D > Remote backend: the URL, this token and the fingerprint "
              "the backend printed at start.", file=sys.stderr)
    return 0


def run_list(args: Any) -> int:
    users = _store(args).list()
    if args.json:
        print(json.dumps([{"name": u.name, "created_at": u.created_at} for u in users]))
    elif not users:
        print("No users. Add one with `make-your-3d users add NAME`.")
    else:
        for u in users:
            print(f"{u.name}\tadded {time.strftime('%Y-%m-%d %H:%M', time.localtime(u.created_at))}")
    return 0


def run_remove(args: Any) -> int:
    _store(args).remove(args.name)
    if args.json:
        print(json.dumps({"removed": args.name}))
    else:
        print(f"Removed user {args.name!r}; their token no longer works.")
    return 0
