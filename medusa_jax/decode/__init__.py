"""Decoding: sampling, the acceptance rules, the drafters (Medusa heads, prompt lookup, draft
models), the plain and the speculative loops, the `Engine` API."""
