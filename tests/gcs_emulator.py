"""A local Google Cloud Storage for tests: gcp-storage-emulator in a thread on 127.0.0.1.

`start(bucket)` returns (server, url). `environment(url)` gives the variables that point
gcsfs / etils.epath (STORAGE_EMULATOR_HOST) and tensorstore, hence orbax
(TENSORSTORE_GCS_HTTP_URL) at it with anonymous credentials; subprocesses (train.py, eval.py)
get them through their environment, this process through os.environ.

Two gaps of the emulator (gcp-storage-emulator 2026.7) that our clients hit are filled here:
  * objects.list ignores `startOffset`/`endOffset`; tensorstore sends them for every listing and
    range delete, and gets the whole bucket back (listing a sub-path then aborts the process,
    a range delete removes objects outside the range). The handler below honours them.
  * objects.moveTo is missing; gcsfs (>= 2025) renames through it and, on the 501, retries
    with back-off for ~30 s before copying. A copy-and-delete moveTo is added.
  * media downloads lack the `x-goog-generation` header real GCS sends; tensorstore reads an
    object's generation from it (for OCDBT's manifest, rewritten in place when a step is saved
    again after a crash) and fails with "Malformed StorageGeneration" without it. Added.
Not filled: preconditions (`ifGenerationMatch`) are accepted and ignored, so nothing that
relies on them (compare-and-swap between concurrent writers) can be tested against it.
"""
from __future__ import annotations

import socket
import time
from http import HTTPStatus

from gcp_storage_emulator import server as emulator_server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects as object_handlers

_plain_list = object_handlers.ls
_plain_download = object_handlers.download


def _query(request, name):
    values = request.query.get(name)
    return values[0] if values else None


def _list_within_offsets(request, response, storage, *args, **kwargs):
    start, end = _query(request, "startOffset"), _query(request, "endOffset")
    if start is None and end is None:
        return _plain_list(request, response, storage, *args, **kwargs)
    try:
        files, prefixes = storage.get_file_list(
                request.params["bucket_name"], _query(request, "prefix"),
                _query(request, "delimiter"), _query(request, "matchGlob"))
    except NotFound:
        response.status = HTTPStatus.NOT_FOUND
        return
    inside = lambda name: (start is None or name >= start) and (end is None or name < end)  # noqa
    response.json({"kind": "storage#objects",
                   "prefixes": [p for p in (prefixes or []) if inside(p)],
                   "items": [f for f in files if inside(f["name"])]})


def _move_to(request, response, storage, *args, **kwargs):
    bucket = request.params["bucket_name"]
    try:
        moved = object_handlers._copy(request.base_url, storage, bucket,
                                      request.params["object_id"], bucket,
                                      request.params["dest_object_id"])
        storage.delete_file(bucket, request.params["object_id"])
    except NotFound:
        response.status = HTTPStatus.NOT_FOUND
        return
    response.json(moved)


def _download_with_generation(request, response, storage, *args, **kwargs):
    try:
        metadata = storage.get_file_obj(request.params["bucket_name"],
                                        request.params["object_id"])
    except NotFound:
        metadata = None
    if metadata is not None:
        response["x-goog-generation"] = str(metadata.get("generation", "1"))
        response["x-goog-metageneration"] = str(metadata.get("metageneration", "1"))
    return _plain_download(request, response, storage, *args, **kwargs)


# Seconds every request waits before it is served (bench/bucket_goodput.py: a slow bucket).
_latency = {"seconds": 0.0}
_plain_route = emulator_server.Router.handle


def _route_after_latency(router, method):
    if _latency["seconds"]:
        time.sleep(_latency["seconds"])
    return _plain_route(router, method)


def _patch_handlers() -> None:
    object_handlers.download = _download_with_generation  # `get` calls it for alt=media
    emulator_server.Router.handle = _route_after_latency
    handlers = emulator_server.HANDLERS
    if any(table.get("POST") is _move_to for _, table in handlers):
        return
    for _, table in handlers:
        if table.get("GET") is _plain_list:
            table["GET"] = _list_within_offsets
    move_route = (r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)"
                  r"/moveTo/o/(?P<dest_object_id>.*[^/]+)$")
    emulator_server.HANDLERS = ((move_route, {"POST": _move_to}),) + tuple(handlers)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(bucket: str, *, latency: float = 0.0):
    """(server, url): an in-memory emulator holding `bucket`, serving from a thread;
    `latency` seconds are added to every request (requests are served one at a time)."""
    _patch_handlers()
    _latency["seconds"] = float(latency)
    port = _free_port()
    server = emulator_server.create_server("127.0.0.1", port, in_memory=True,
                                           default_bucket=bucket)
    server.start()  # returns once the socket is bound
    return server, f"http://127.0.0.1:{port}"


def environment(url: str) -> dict[str, str]:
    """Variables that send gcsfs and tensorstore to the emulator at `url`, anonymously."""
    return {
            "STORAGE_EMULATOR_HOST": url,
            "FSSPEC_GCS_TOKEN": "anon",
            "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
            # gcsfs asks a gRPC endpoint for the bucket type first (60 s time-out against
            # the emulator); it reads this when imported.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "FSSPEC_GCS_USE_LISTINGS_CACHE": "false",
            # array_record reads ArrayRecord shards in a bucket with its own C++ GCS client
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
    }
