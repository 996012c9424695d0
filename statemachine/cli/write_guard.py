"""What the CLI may write where (DESIGN §6): nothing we write overwrites a file without `--force`, and never, even with
it, a layer of any registered server's chain or of the chain being read.

`check_output` guards a file a command is about to (re)create; `check_layer_write` guards a layer a command writes
into in place (`vhd write`); `replacing` writes a new file beside OUT and renames it into place only when it is
complete, so a failed write never leaves a half file at OUT (nor destroys the file that was there).

Layers are compared both by resolved path (symlinks followed) and by inode (hard links), so neither a symlink nor a
hard link to a layer gets past the guard. The registered servers are read from the state store of `settings`, all
tenants: a server's chain is opened from its leaf when the leaf is a local file (or a key of a `file://` store);
when the chain cannot be opened, the leaf and the VHD files beside it are protected instead, whole.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from functions.settings import Settings
from statemachine.cli.common import UserError


@dataclass(frozen=True)
class Protected:
    """A file that must not be overwritten, and why (whose chain it belongs to)."""

    path: Path
    owner: str


def _stat_key(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return Path.cwd() / path


def chain_files(leaf: Path) -> list[Path]:
    """The layer files of the chain whose leaf is `leaf`, leaf first; when the chain cannot be opened (missing parent,
    a coalesce pending, a malformed layer), the leaf and the VHD files of its folder, so that nothing that may be a
    layer is given away."""
    import vhdcore

    try:
        return [Path(layer.path) for layer in vhdcore.open_chain(str(leaf)).layers]
    except (vhdcore.VhdError, OSError, ValueError):
        pass
    files = [leaf]
    with suppress(OSError):
        files += [p for p in leaf.parent.iterdir() if p.suffix.lower() == ".vhd" and p != leaf]
    return files


def _file_store_root(url: str | None) -> Path | None:
    if not url:
        return None
    parts = urlsplit(url)
    if parts.scheme != "file":
        return None
    return Path(unquote(parts.path))


def _server_leaves(settings: Settings) -> list[tuple[str, Path]]:
    """(server id, local leaf file) of every registered server whose disk is a local file or a key of a `file://`
    store; servers on S3 have no file here to protect."""
    from functions.state import open_state_store
    from functions.state.urls import SqliteLocation, parse_state_url

    where = parse_state_url(settings.state_url)
    if isinstance(where, SqliteLocation) and not where.path.exists():
        return []  # no state yet: no server registered (and nothing to create just to read it)
    state = open_state_store(settings.state_url, endpoint_url=settings.endpoint_url)
    try:
        servers = state.list_all_servers()
    finally:
        state.close()
    root = _file_store_root(settings.disks_url or settings.store_url)
    leaves: list[tuple[str, Path]] = []
    for server in servers:
        locations = [server.disk, *(server.chain or ()), *server.garbage]
        if server.merging is not None:
            locations += [server.merging.child, server.merging.parent, server.merging.key]
        for location in dict.fromkeys(locations):
            if location.startswith("/"):
                leaves.append((server.id, Path(location)))
            elif root is not None:
                leaves.append((server.id, root / location))
    return leaves


def protected_files(settings: Settings, reading: Sequence[Path] = ()) -> list[Protected]:
    """Every file no command may overwrite: the layers of the chains in `reading` (their leaves) and of every
    registered server's chain."""
    found = [Protected(path, f"the chain of {leaf}") for leaf in reading for path in chain_files(Path(leaf))]
    for server_id, leaf in _server_leaves(settings):
        found += [Protected(path, f"registered server {server_id}'s chain") for path in chain_files(leaf)]
    return found


def layer_owner(path: Path, protected: Sequence[Protected]) -> str | None:
    """Whose layer `path` is (by resolved path or by inode), or None."""
    target = _resolved(path)
    key = _stat_key(path)
    for item in protected:
        if _resolved(item.path) == target:
            return item.owner
        if key is not None and _stat_key(item.path) == key:
            return item.owner
    return None


def check_output(path: Path, *, force: bool, settings: Settings, reading: Sequence[Path] = ()) -> None:
    """Refuse (UserError) to write the file `path` when it is a layer of a chain in `reading` or of a registered
    server's chain (whatever `force`), when it exists and is not a regular file, or when it exists and not `force`."""
    path = Path(path)
    owner = layer_owner(path, protected_files(settings, reading))
    if owner is not None:
        raise UserError(
            f"{path}: is a layer of {owner}; refusing to overwrite it (even with --force)",
            hint="choose another output file; a layer of a chain in use is never overwritten",
        )
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise UserError(f"{path}: exists and is not a regular file", hint="choose a path for a new regular file")
        if not force:
            raise UserError(f"{path}: already exists", hint="pass --force to replace it")


def check_layer_write(path: Path, *, settings: Settings) -> None:
    """Refuse (UserError) to write into `path` in place when it is a layer of a registered server's chain."""
    path = Path(path)
    owner = layer_owner(path, protected_files(settings))
    if owner is not None:
        raise UserError(
            f"{path}: is a layer of {owner}; refusing to write into it (even with --force)",
            hint="the server's disks change only through imaging; snapshot a copy to experiment",
        )


def temporary_beside(out: Path) -> Path:
    """A path for a new file in OUT's folder (so that renaming it onto OUT is atomic), not yet created."""
    return out.parent / f".{out.name}.{secrets.token_hex(6)}.tmp"


@contextmanager
def replacing(out: Path) -> Iterator[Path]:
    """Yield a temporary path beside `out` to write the new file to; when the block succeeds, rename it onto `out`
    (replacing the file there, if any, atomically), else remove it and leave `out` as it was."""
    out = Path(out)
    temporary = temporary_beside(out)
    try:
        yield temporary
        temporary.replace(out)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
