"""Head training: config, data, losses, optimizer, the jitted step, the hidden-state cache, checkpoints, the loop."""
