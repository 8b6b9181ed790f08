"""Decoding: sampling, the acceptance rules, the plain and the Medusa loops, the `Engine` API."""
