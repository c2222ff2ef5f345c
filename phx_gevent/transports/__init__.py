"""Transports: WebSocket and long-poll, the writers, and the HTTP pieces they share."""
