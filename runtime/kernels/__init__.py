"""Kernel units: each module holds one fused kernel's template, its autotune configs, its launcher and its
plain-torch reference, named after what it computes."""
