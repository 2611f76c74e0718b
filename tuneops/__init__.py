"""tuneops: fine-tune, evaluate, gate, register and serve foundation models on your own data."""
