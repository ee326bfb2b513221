"""Plans and teacher stores (Zarr format 3) on disk or behind fsspec URLs: the format, ids, locking and checking."""

from kdcache.store.cache import Cache, size_on_disk
from kdcache.store.format import (FORMAT_VERSION, chunk_rows_for, plan_id, sha256_file, shard_rows_for,
                                  teacher_id)
from kdcache.store.location import Location
from kdcache.store.lock import WriterLock
from kdcache.store.plan import PlanStore
from kdcache.store.teacher import TeacherStore

__all__ = [
    "Cache", "FORMAT_VERSION", "Location", "PlanStore", "TeacherStore", "WriterLock",
    "chunk_rows_for", "plan_id", "sha256_file", "shard_rows_for", "size_on_disk", "teacher_id",
]
