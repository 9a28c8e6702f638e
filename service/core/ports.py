"""Ports a setting names: whether one is free, and what to tell an operator when it is not."""

from __future__ import annotations

import socket

from service.core.settings import env_name

__all__ = ["busy_port_message", "port_is_free"]


def port_is_free(host: str, port: int) -> bool:
    """Whether ``port`` on ``host`` can be bound now (0, a free port picked later, always can)."""
    if port == 0:
        return True
    family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def busy_port_message(what: str, host: str, port: int, setting: str) -> str:
    """One line naming the port, what wanted it, and the flag and variable that move it."""
    flag = "--" + setting.replace("_", "-")
    return (
        f"the {what} port {port} on {host} is already in use (another convserve?): choose "
        f"another with {flag} or {env_name(setting)}, or 0 for a free one"
    )
