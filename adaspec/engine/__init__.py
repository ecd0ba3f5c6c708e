"""Engine: sequences, KV slots, scheduler, model runner, sampling and the speculative step."""
