"""headswap.adapters: tenant head architectures, their training and serialization (needs torch)."""
