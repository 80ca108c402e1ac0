"""X-VLM multi-grained pretraining: encoders, losses, box ops, config, distributed engine, checkpoints."""
