"""headswap.server: the gRPC service around the frozen backbone."""
