"""edgefa: train with feedback alignment on the host, fine-tune with DFA on the device without torch."""

__version__ = "0.1.0"
