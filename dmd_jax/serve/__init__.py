"""The edge-cloud link: the cloud as a gRPC server (`server`, run by the `serve` job), the
edge's client (`client.RemoteCloud`), and the message schema (`cloud.proto`, with its
generated `cloud_pb2*.py`; `messages` converts clips to and from it)."""
