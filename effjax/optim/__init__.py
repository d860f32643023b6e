"""optax transformations and schedules: GaLore, the jagged (re-warm) schedule, SST/ReLoRA."""
