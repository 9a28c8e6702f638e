"""The vocabulary every layer shares.

Errors with their status codes, settings, shared request types, logging and the event loop.
"""
