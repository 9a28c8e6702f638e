"""The wire: gRPC servicers, status mapping, health, streams and the KServe tensor codec."""
