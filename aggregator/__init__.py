"""The aggregator role: FlexLoRA math, the round store, and the service that joins them to the broker."""
