"""The one trainer, its objectives, optimizer, schedule and resumable state (state.py; model files: checkpoints/)."""
