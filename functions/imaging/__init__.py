"""The imaging domain (DESIGN §2): jobs and locks, snapshot, planning, compressing, uploading, finalizing and the
failure path, over an injected object store and state store. No engine, CLI or HTTP code is imported here."""
