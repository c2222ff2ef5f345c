"""The channel runtime: channel processes and the greenlet pool they run in."""
