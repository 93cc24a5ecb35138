"""The one trainer, its objectives, optimizer, schedule and checkpoints."""
