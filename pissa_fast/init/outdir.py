"""The output folder of `pissa-fast init`: the rules for using it, its staging area, and the final
moves that put the residual model at OUT and the adapter at OUT/pissa_init.

Everything is produced in OUT/.pissa_fast_staging (run.json there says which run it belongs to; a
rerun of the same command resumes it). When both outputs are complete a `moving` marker and a
manifest are written, and the files are moved into OUT in an order that never pairs an adapter with
a residual it was not made for:

    1. the old adapter, if any, leaves OUT/pissa_init first (from here until step 4 OUT has none);
    2. old weight files that the new residual does not replace leave OUT;
    3. the residual's files and folders replace their namesakes in OUT, one rename each;
    4. the new adapter is renamed to OUT/pissa_init; the staging folder is removed.

An interruption anywhere leaves either the old pair, or no adapter next to a staging folder that
`pissa-fast verify` reports and a rerun finishes.

Under torchrun every rank writes its shards into the same staging folder, so OUT must be on a
filesystem all ranks share: rank 0 leaves a token there (team.json) that every other rank must read
back before it writes anything, and rank 0 waits until every rank's shards show before it finishes
(a network filesystem may show another host's new files a little late).
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable

from ..errors import CheckpointError
from ..hf.checkpoint import INDEX_SUFFIX
from ..io.staging import fsync_dir, is_tmp, remove, write_text
from ..pairing import ADAPTER_DIR, STAGING

RUN_FILE = "run.json"
TEAM_FILE = "team.json"
VISIBLE_TIMEOUT_S = 120.0  # NFS caches directory entries for up to 60 s by default (acdirmax)
MOVING = "moving"
MANIFEST = "manifest.json"
STAGED_ADAPTER = "adapter"
OLD = "old"


def check_out_dir(out: str, run_key: dict, overwrite: bool) -> str:
    """Can `out` take this run? Returns "new", "resume" (same run interrupted) or "moving" (only the
    final moves are left). Raises CheckpointError; reads only."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise CheckpointError(f"{out}: exists and is not a directory")
    entries = set(os.listdir(out)) if os.path.isdir(out) else set()
    previous = None
    if STAGING in entries:
        try:
            with open(os.path.join(out, STAGING, RUN_FILE)) as fh:
                previous = json.load(fh)
        except (OSError, ValueError):
            previous = None
    if previous is not None and previous == run_key:
        return MOVING if os.path.exists(os.path.join(out, STAGING, MOVING)) else "resume"
    if previous is not None and not overwrite:
        raise CheckpointError(f"{out}: holds an interrupted run with different settings or inputs; rerun that "
                              f"command to finish it, or pass --overwrite to start over")
    others = sorted(entries - {STAGING})
    if others and not overwrite:
        raise CheckpointError(f"{out}: exists and is not empty ({', '.join(others[:4])}); pass --overwrite to write "
                              f"the residual model and {ADAPTER_DIR}/ into it (files of the same names are replaced, "
                              f"old *.safetensors weights removed, other files kept)")
    return "new"


def prepare(out: str, run_key: dict, state: str) -> str:
    """Create or reuse the staging folder for a run check_out_dir accepted; returns its path."""
    staging = os.path.join(out, STAGING)
    os.makedirs(out, exist_ok=True)
    if state == "new":
        remove(staging)
        os.makedirs(staging)
        write_text(os.path.join(staging, RUN_FILE), json.dumps(run_key, indent=1, sort_keys=True))
    else:  # leftovers of the interrupted process: partial files under temporary names
        for d, dirs, files in os.walk(staging):
            for name in files + dirs:
                if is_tmp(name):
                    remove(os.path.join(d, name))
    return staging


def mark_moving(staging: str, residual_dir: str, summary: dict) -> None:
    """Both outputs are complete in staging: record what the residual consists of (and the run's
    summary, for a rerun that only moves), then the marker."""
    write_text(os.path.join(staging, MANIFEST), json.dumps({"residual": sorted(os.listdir(residual_dir)),
                                                            "summary": summary}))
    write_text(os.path.join(staging, MOVING), "")


def staged_summary(staging: str) -> dict:
    with open(os.path.join(staging, MANIFEST)) as fh:
        return json.load(fh)["summary"]


def move_into_place(staging: str, out: str, residual_dir: str) -> None:
    """Steps 1-4 of the module doc; safe to rerun after an interruption at any point."""
    with open(os.path.join(staging, MANIFEST)) as fh:
        manifest = set(json.load(fh)["residual"])
    adapter = os.path.join(staging, STAGED_ADAPTER)
    old = os.path.join(staging, OLD)
    os.makedirs(old, exist_ok=True)
    final_adapter = os.path.join(out, ADAPTER_DIR)
    if os.path.isdir(adapter):  # the new adapter is not in place yet
        if os.path.lexists(final_adapter):
            remove(os.path.join(old, ADAPTER_DIR))
            os.replace(final_adapter, os.path.join(old, ADAPTER_DIR))
            fsync_dir(out)
        for name in os.listdir(out):
            if (name.endswith(".safetensors") or name.endswith(INDEX_SUFFIX)) and name not in manifest:
                remove(os.path.join(old, name))
                os.replace(os.path.join(out, name), os.path.join(old, name))
        for name in sorted(os.listdir(residual_dir)):
            src, dst = os.path.join(residual_dir, name), os.path.join(out, name)
            if os.path.lexists(dst) and (os.path.isdir(dst) or os.path.isdir(src)):  # a rename cannot replace these
                remove(os.path.join(old, name))
                os.replace(dst, os.path.join(old, name))
            os.replace(src, dst)
        fsync_dir(out)
        os.replace(adapter, final_adapter)
        fsync_dir(out)
    remove(staging)
    fsync_dir(out)


def write_team(staging: str, world_size: int) -> str:
    """Rank 0: a fresh token in the staging folder, which every rank must read back (check_team)."""
    token = uuid.uuid4().hex
    write_text(os.path.join(staging, TEAM_FILE), json.dumps({"token": token, "world_size": world_size,
                                                              "host": socket.gethostname()}))
    return token


def _poll(ready: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def check_team(staging: str, token: str, rank: int, timeout_s: float | None = None) -> None:
    """This rank sees the staging folder rank 0 prepared, i.e. OUT is shared with rank 0. Raises
    CheckpointError after timeout_s (default VISIBLE_TIMEOUT_S) otherwise, before this rank writes."""
    path = os.path.join(staging, TEAM_FILE)
    timeout_s = VISIBLE_TIMEOUT_S if timeout_s is None else timeout_s

    def ready() -> bool:
        try:
            with open(path) as fh:
                return json.load(fh).get("token") == token
        except (OSError, ValueError):
            return False

    if not _poll(ready, timeout_s):
        raise CheckpointError(f"rank {rank} (host {socket.gethostname()}) does not see {path}, which rank 0 wrote: "
                              f"OUT must be one folder that every rank shares, at the same path (a network "
                              f"filesystem such as NFS or Lustre when the ranks are on several hosts)")


def wait_visible(staging: str, shards: list, done: Callable[[str], bool], timeout_s: float | None = None) -> None:
    """Rank 0: wait until every shard the ranks reported finished shows complete in staging."""
    timeout_s = VISIBLE_TIMEOUT_S if timeout_s is None else timeout_s
    for shard in shards:
        if not _poll(lambda: done(shard), timeout_s):
            raise CheckpointError(f"{shard}: another rank reported it finished, but rank 0 (host "
                                  f"{socket.gethostname()}) does not see it complete in {staging} after "
                                  f"{timeout_s:.0f} s: is OUT one folder that every rank shares?")
