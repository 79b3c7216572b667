"""The leader's engine: sequences, scheduling of steps, stop handling, token events."""
