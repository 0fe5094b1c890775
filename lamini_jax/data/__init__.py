"""Host-side data: dataset sources, facts, prompt encoding and batches (numpy)."""
