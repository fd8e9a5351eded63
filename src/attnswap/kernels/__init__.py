"""How attention is executed: pure tensor functions with documented shapes; no HF code, no variants."""
