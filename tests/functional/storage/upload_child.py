"""Uploads one file in a child process, printing each event on its own line, so a test can SIGKILL it anywhere.

Usage: python upload_child.py '{"store": URL, "endpoint": URL|null, "key": K, "path": P, "part_size": N,
"concurrency": N}'
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from functions.storage import make_s3_client, open_object_store
from functions.storage.parts import plan_fixed_parts
from functions.storage.upload import UploadOptions, upload_file


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    args = json.loads(sys.argv[1])
    client = make_s3_client(args["endpoint"]) if args["store"].startswith("s3://") else None
    store = open_object_store(args["store"], s3_client=client)
    path = Path(args["path"])
    parts = plan_fixed_parts(path.stat().st_size, args["part_size"])
    options = UploadOptions(
        concurrency=args["concurrency"],
        progress=lambda done, total: say(f"progress {done} {total}"),
        phase=lambda phase: say(f"phase {phase}"),
    )
    result = upload_file(store, path, args["key"], parts, options=options)
    say(f"result {result.upload_id}")


if __name__ == "__main__":
    main()
