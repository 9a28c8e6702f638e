"""Tools outside the request path.

The client, the benchmark with its load generator and gRPC floor, and the server-process harness.
"""
