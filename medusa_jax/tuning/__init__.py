"""Measuring heads and devices to pick a tree: head accuracy, the tree builder, step timing."""
