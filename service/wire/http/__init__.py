"""KServe v2 over HTTP/REST (with Triton's extensions), served beside gRPC on the same loop.

:mod:`.app` builds and serves the aiohttp application; :mod:`.routes` holds what every route
shares (restriction, drain, accounting, JSON errors); :mod:`.kserve_routes` the endpoints;
:mod:`.tensors` and :mod:`.answers` the inference bodies; :mod:`.json_messages` the JSON of the
metadata, configuration and statistics answers; :mod:`.statuses` the HTTP status of each error.
"""
