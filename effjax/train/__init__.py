"""Train state, jitted steps, the loop, checkpointing and metrics."""
