"""Everything that crosses a process boundary: message headers, tensor payloads, LoRA key layout."""
