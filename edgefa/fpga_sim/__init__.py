"""The DFA step in bit-exact fixed point, and a cost model of a MAC-array accelerator (no torch)."""
