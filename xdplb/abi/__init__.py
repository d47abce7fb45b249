"""The ABI shared with the BPF program: map layouts, constants, and their encodings."""
