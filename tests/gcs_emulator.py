"""A local Cloud Storage for the tests: `python tests/gcs_emulator.py PORT BUCKET`.

gcp-storage-emulator (a stub of the JSON API), with one gap of it filled: a real
download carries the object's generation in `x-goog-generation` headers, which
tensorstore (orbax's storage layer) reads to make its conditional writes; the stub
omits them. Listens on 127.0.0.1 only, in memory; the test that starts it stops it.
"""

import sys

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


_download = objects.download


def download_with_generation(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
        return
    response["x-goog-generation"] = obj["generation"]
    response["x-goog-metageneration"] = obj["metageneration"]


def main() -> None:
    port, bucket = int(sys.argv[1]), sys.argv[2]
    objects.download = download_with_generation  # `get ?alt=media` calls it by name
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is _download:
                handlers[method] = download_with_generation
    server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
    main()
