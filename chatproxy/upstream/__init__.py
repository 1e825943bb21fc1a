"""Upstream adapters: one per openai SDK generation, behind :mod:`chatproxy.upstream.base`."""
