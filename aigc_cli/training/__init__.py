"""Training: the loop, one step function per objective, precision handling and resumable state."""
